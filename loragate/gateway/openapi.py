"""The OpenAPI document (`/openapi.json`, `/docs`) with every route's real request and response
models, while the routes keep parsing bodies by hand.

Routes read their JSON body with `parse_body` (so that auth runs first, malformed JSON is a 400 in
the OpenAI shape, and size/nesting limits apply before parsing); FastAPI therefore cannot see
their body models. `json_body(Model)` is the route's `openapi_extra`: it declares the body as a
reference to the model's schema, and `install_openapi` adds those schemas to the document's
components. Error responses are declared with `ErrorResponse`, the shape `errors.py` renders, and
FastAPI's default 422 (which this server never sends: schema errors are 400) is removed. Routes
with their own error shape (LoRAX's) pass their error model and texts to `error_responses`; a
stream's events name their JSON model with `contentSchema` (`sse_content`).
"""
from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

_REF = "#/components/schemas/{model}"
_BODY_MODELS: dict[str, type[BaseModel]] = {}  # and the models stream events refer to


# ---- response models that exist only for the document (the routes build plain dicts) ----------

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error outside LoRAX's routes: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorDetail


class AdapterCard(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    path: str
    tier: str
    size_bytes: int
    rank: int | None = None
    requests_served: int
    load_count: int
    last_load_seconds: float | None = None
    pinned: bool
    error: str | None = None


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterCard]


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    deleted: bool


class HealthStatus(BaseModel):
    status: str
    error: ErrorDetail | None = None


_ERROR_TEXT = {400: "Invalid request", 401: "Missing or wrong API key", 403: "The key may not do this",
               404: "No such model or adapter (or not visible to this key)", 409: "Name already taken",
               413: "Request body too large", 429: "Rate limited (see Retry-After)",
               500: "Internal error", 503: "Overloaded, shutting down or engine not running (see Retry-After)"}


# one server-sent event (OpenAPI before 3.2 describes each event of a stream with `schema`)
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "description": "a JSON chunk, an error object, or [DONE] at the end"},
    "event": {"type": "string"}}}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route whose JSON body is parsed by hand into `model`."""
    _BODY_MODELS[model.__name__] = model
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}}}}


def error_responses(*statuses: int, model: type[BaseModel] = ErrorResponse,
                    text: dict[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """The error statuses of a route, each a JSON `model` (the OpenAI shape unless told). Written as
    explicit application/json content (not FastAPI's `model`, which would take the media type of
    the route's success response, e.g. vLLM's text/plain)."""
    text = text or _ERROR_TEXT
    _BODY_MODELS[model.__name__] = model
    content = {"application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}}
    return {s: {"description": text[s], "content": content} for s in statuses}


def streamed(model: type[BaseModel], *errors: int) -> dict[int | str, dict[str, Any]]:
    """200 is `model` as JSON, or an SSE stream (`stream: true`) of its chunks, then errors."""
    return {200: {"model": model, "description": "The response, or with `stream: true` a text/event-stream of "
                  "`data: {chunk}` events ending in `data: [DONE]`",
                  "content": {"text/event-stream": {"schema": SSE_EVENT}}},
            **error_responses(*errors)}


def sse_content(event: type[BaseModel], description: str) -> dict[str, Any]:
    """`content` of a text/event-stream response whose events' `data` are JSON `event`s (as
    FastAPI's own SSE routes describe them: `contentMediaType` + `contentSchema`)."""
    _BODY_MODELS[event.__name__] = event
    data = {"type": "string", "contentMediaType": "application/json", "description": description,
            "contentSchema": {"$ref": _REF.format(model=event.__name__)}}
    return {"text/event-stream": {"schema": {**SSE_EVENT, "properties": {**SSE_EVENT["properties"], "data": data}}}}


def install_openapi(app: FastAPI) -> None:
    """Replace `app.openapi` with a generator that adds the hand-parsed body models."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        if _BODY_MODELS:
            _, defs = models_json_schema([(m, "validation") for m in _BODY_MODELS.values()], ref_template=_REF)
            for name, schema in defs.get("$defs", {}).items():
                schemas.setdefault(name, schema)
        for path in doc.get("paths", {}).values():
            for op in path.values():
                responses = op.get("responses", {})
                if not _declares_422(op):
                    responses.pop("422", None)  # FastAPI's default: schema errors are 400 here
                ok = responses.get("200", {}).get("content", {})
                if "text/event-stream" in ok and ok.get("application/json", {}).get("schema") == {}:
                    del ok["application/json"]  # a stream-only route: FastAPI's default JSON 200 is not sent
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi


def _declares_422(op: dict[str, Any]) -> bool:
    """A route's own 422 (LoRAX's validation error) rather than FastAPI's HTTPValidationError."""
    ref = op.get("responses", {}).get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
    return ref.get("$ref", "").split("/")[-1] not in ("", "HTTPValidationError")
