"""Per-app and per-request state the routes share, and the FastAPI dependencies that reach it:
the app's `GatewayContext`, the request's `RequestRecord` (read by the logging middleware),
authentication, and JSON body parsing in the OpenAI error shape."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel

from loragate.gateway.auth import KeyStore, Principal
from loragate.gateway.limits import load_json_body
from loragate.gateway.metrics import GatewayMetrics
from loragate.gateway.quotas import KeyQuotas
from loragate.gateway.settings import GatewaySettings

M = TypeVar("M", bound=BaseModel)


@dataclass
class RequestRecord:
    """Filled in by routes, read by the logging middleware: one log line per request."""

    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    start: float = field(default_factory=time.monotonic)
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    counted: bool = False  # an inference request: counted in loragate_requests
    outcome: str | None = None  # overrides the HTTP status for streams (aborted | error)
    principal: Principal | None = None  # set by `authenticate`; per-key limits read it
    receive: Any = None  # the ASGI receive channel, so generations notice a client that left


@dataclass
class GatewayContext:
    engine: Any
    settings: GatewaySettings
    keys: KeyStore
    metrics: GatewayMetrics
    inflight: int = 0
    waiting: int = 0  # engine requests submitted that have not produced their first output yet
    draining: bool = False  # SIGTERM received: /health and new inference answer 503
    generations: set = field(default_factory=set)  # live `Generation`s, ended by a drain's deadline
    quotas: KeyQuotas = field(default_factory=KeyQuotas)
    max_json_items: int = 1 << 18  # settings.max_json_items, or derived from the model by create_app


def get_ctx(request: Request) -> GatewayContext:
    return request.app.state.ctx


def get_record(request: Request) -> RequestRecord:
    rec = getattr(request.state, "record", None)
    if rec is None:  # app used without the middleware (e.g. mounted elsewhere)
        rec = RequestRecord()
        request.state.record = rec
    return rec


async def authenticate(request: Request) -> Principal:
    """FastAPI dependency: runs before the body is read, so a bad key is 401 whatever the body.
    Async so that it runs on the event loop instead of a worker thread (it only hashes a key)."""
    principal = get_ctx(request).keys.authenticate(request.headers.get("authorization"))
    rec = get_record(request)
    rec.principal = principal
    if rec.receive is None:
        rec.receive = request.receive
    return principal


async def parse_body(request: Request, model: type[M]) -> M:
    """Parse JSON ourselves so auth runs first and malformed JSON is a 400 in the OpenAI shape;
    the body's size, nesting, array lengths and unicode are bounded first (`limits.py`)."""
    ctx = get_ctx(request)
    data = load_json_body(await request.body(), ctx.settings.max_json_depth, ctx.max_json_items)
    return model.model_validate(data)  # ValidationError -> 400 by the installed handler
