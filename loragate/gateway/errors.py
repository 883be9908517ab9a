"""Every failure as `{"error": {"message", "type", "param", "code"}}` with the HTTP status that
openai-python maps to the matching exception class (400 BadRequestError, 401 AuthenticationError,
403 PermissionDeniedError, 404 NotFoundError, 429 RateLimitError, 5xx InternalServerError).

Routes raise `APIError` (or let engine errors escape); the handlers here render them. FastAPI's
default 422 for schema violations is replaced by 400 because that is what OpenAI returns and what
the SDK turns into BadRequestError.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from loragate.engine.errors import (
    AdapterLoadError,
    AdapterNotFoundError,
    EngineDeadError,
    PromptTooLongError,
    QueueFullError,
)

log = logging.getLogger("loragate.gateway")


@dataclass
class APIError(Exception):
    """An error the client should see, already classified."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:  # so logs show the message, not the dataclass repr
        return f"{self.status} {self.message}"

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers or None)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def unsupported(param: str, what: str | None = None) -> APIError:
    """400 for a field we understand but do not implement: never silently ignore it."""
    return bad_request(f"{what or param!s} is not supported by this server", param=param,
                       code="unsupported_parameter")


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model '{model}' does not exist or you do not have access to it.",
                    "invalid_request_error", "model", "model_not_found")


def from_engine_error(exc: Exception, retry_after: int = 1) -> APIError | None:
    """Translate an engine exception (or a ValueError from parameter validation) to an APIError;
    None for anything unexpected, which the caller reports as a 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc) or "server is busy, retry later", "rate_limit_error", None,
                        "rate_limit_exceeded", {"Retry-After": str(retry_after)})
    if isinstance(exc, PromptTooLongError):
        return bad_request(str(exc), "messages", "context_length_exceeded")
    if isinstance(exc, AdapterNotFoundError):
        return APIError(404, str(exc), "invalid_request_error", "model", "model_not_found")
    if isinstance(exc, AdapterLoadError):
        return bad_request(f"adapter could not be loaded: {exc}", "model", "adapter_load_error")
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"the engine is not running: {exc}", "server_error", None, "engine_dead")
    if isinstance(exc, ValueError):
        return bad_request(str(exc))
    return None


def internal_error() -> APIError:
    return APIError(500, "internal server error", "server_error", None, "internal_error")


def _validation_message(errors: list) -> tuple[str, str | None]:
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    return (f"{param}: {msg}" if param else msg), param


def install_error_handlers(app: FastAPI) -> None:
    """Render APIError, schema errors and starlette's own 404/405 in the OpenAI shape."""

    async def on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        errs = exc.errors() if hasattr(exc, "errors") else []
        msg, param = _validation_message(list(errs))
        return bad_request(msg, param).response()

    async def on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err = APIError(404, "not found", "invalid_request_error", None, "not_found")
        elif exc.status_code == 405:
            err = APIError(405, "method not allowed", "invalid_request_error", None, "method_not_allowed")
        else:
            err = APIError(exc.status_code, str(exc.detail), "invalid_request_error")
        resp = err.response()
        for k, v in (exc.headers or {}).items():
            resp.headers[k] = v
        return resp

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(ValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
