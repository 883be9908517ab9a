"""`create_app(engine, settings)`: the FastAPI application around one engine.

The engine is passed in (not built here) so tests can hand in a fake and the CLI the real one;
the app's lifespan starts it and shuts it down. All state lives on `app.state.ctx`, never in
module globals, so several apps can coexist in one process (tests do).
"""
from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

from loragate import __version__
from loragate.gateway.auth import KeyStore
from loragate.gateway.context import GatewayContext
from loragate.gateway.errors import install_error_handlers
from loragate.gateway.limits import BodyLimitMiddleware, json_items_limit
from loragate.gateway.metrics import GatewayMetrics
from loragate.gateway.middleware import RequestLogMiddleware
from loragate.gateway.openapi import install_openapi
from loragate.gateway.routes import (
    adapters,
    chat,
    completions,
    health,
    lorax,
    metrics,
    models,
    playground,
    vllm,
)
from loragate.gateway.settings import GatewaySettings


def create_app(engine, settings: GatewaySettings | None = None) -> FastAPI:
    """Build the app. Raises ValueError (pydantic.ValidationError) on a malformed keys file."""
    settings = settings or GatewaySettings()
    keys = KeyStore.build(settings.api_keys, settings.api_keys_file, settings.admin_keys)
    gateway_metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await engine.start()
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="loragate", version=__version__, lifespan=lifespan)
    app.state.ctx = GatewayContext(engine=engine, settings=settings, keys=keys, metrics=gateway_metrics,
                                   max_json_items=settings.max_json_items or json_items_limit(engine))
    app.state.created = int(time.time())
    install_error_handlers(app)
    install_openapi(app)
    for module in (chat, completions, models, adapters, health, metrics, lorax, vllm):
        app.include_router(module.router)
    if settings.playground:
        app.include_router(playground.router)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_bytes, render=lorax.render_error)
    app.add_middleware(RequestLogMiddleware, metrics=gateway_metrics)  # outermost
    return app
