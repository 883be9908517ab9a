"""Per-app and per-request state the routes share, and the FastAPI dependencies that reach it:
the app's `GatewayContext`, the request's `RequestRecord` (read by the logging middleware),
authentication, and JSON body parsing in the OpenAI error shape."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel

from loragate.gateway.auth import KeyStore, Principal
from loragate.gateway.errors import bad_request
from loragate.gateway.metrics import GatewayMetrics
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


@dataclass
class GatewayContext:
    engine: Any
    settings: GatewaySettings
    keys: KeyStore
    metrics: GatewayMetrics
    inflight: int = 0


def get_ctx(request: Request) -> GatewayContext:
    return request.app.state.ctx


def get_record(request: Request) -> RequestRecord:
    rec = getattr(request.state, "record", None)
    if rec is None:  # app used without the middleware (e.g. mounted elsewhere)
        rec = RequestRecord()
        request.state.record = rec
    return rec


def authenticate(request: Request) -> Principal:
    """FastAPI dependency: runs before the body is read, so a bad key is 401 whatever the body."""
    return get_ctx(request).keys.authenticate(request.headers.get("authorization"))


async def parse_body(request: Request, model: type[M]) -> M:
    """Parse JSON ourselves so auth runs first and malformed JSON is a 400 in the OpenAI shape."""
    raw = await request.body()
    if not raw:
        raise bad_request("request body is required")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"invalid JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    return model.model_validate(data)  # ValidationError -> 400 by the installed handler
