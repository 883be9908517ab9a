"""Per-request bookkeeping as a pure ASGI middleware (BaseHTTPMiddleware would buffer streams and
break disconnect detection).

It gives each request a RequestRecord (routes fill in model and token counts), adds an
`x-request-id` header, turns any unhandled exception into a 500 in the OpenAI error shape
without letting it reach the server, and writes one log line per request when the response has
fully ended: request id, method, path, model, tokens, latency, status. Never the API key.
"""
from __future__ import annotations

import json
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loragate.gateway.context import RequestRecord
from loragate.gateway.errors import internal_error
from loragate.gateway.metrics import GatewayMetrics

log = logging.getLogger("loragate.gateway")


class RequestLogMiddleware:
    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rec = RequestRecord(receive=receive)
        scope.setdefault("state", {})["record"] = rec
        status = 500
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rec.request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            log.exception("unhandled error in request %s", rec.request_id)
            status = 500
            if not started:
                body = json.dumps(internal_error().body()).encode()
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()),
                                        (b"x-request-id", rec.request_id.encode())]})
                await send({"type": "http.response.body", "body": body})
            else:
                rec.outcome = rec.outcome or "error"
        finally:
            outcome = rec.outcome or str(status)
            if rec.counted:
                self.metrics.requests.labels(rec.model or "unknown", outcome).inc()
            log.info("request_id=%s method=%s path=%s model=%s prompt_tokens=%d completion_tokens=%d "
                     "latency=%.3fs status=%s", rec.request_id, scope.get("method"), scope.get("path"),
                     rec.model or "-", rec.prompt_tokens, rec.completion_tokens,
                     time.monotonic() - rec.start, outcome)
