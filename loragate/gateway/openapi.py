"""The OpenAPI document (`/openapi.json`, `/docs`) with every route's real request and response
models, while the routes keep parsing bodies by hand.

Routes read their JSON body with `parse_body` (so that auth runs first, malformed JSON is a 400 in
the OpenAI shape, and size/nesting limits apply before parsing); FastAPI therefore cannot see
their body models. `json_body(Model)` is the route's `openapi_extra`: it declares the body as a
reference to the model's schema, and `install_openapi` adds those schemas to the document's
components. Error responses are declared with `ErrorResponse`, the shape `errors.py` renders, and
FastAPI's default 422 (which this server never sends: schema errors are 400) is removed.
"""
from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

_REF = "#/components/schemas/{model}"
_BODY_MODELS: dict[str, type[BaseModel]] = {}


# ---- response models that exist only for the document (the routes build plain dicts) ----------

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error this server returns: `{"error": {"message", "type", "param", "code"}}`."""

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


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorResponse, "description": _ERROR_TEXT[s]} for s in statuses}


def streamed(model: type[BaseModel], *errors: int) -> dict[int | str, dict[str, Any]]:
    """200 is `model` as JSON, or an SSE stream (`stream: true`) of its chunks, then errors."""
    return {200: {"model": model, "description": "The response, or with `stream: true` a text/event-stream of "
                  "`data: {chunk}` events ending in `data: [DONE]`",
                  "content": {"text/event-stream": {"schema": SSE_EVENT}}},
            **error_responses(*errors)}


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
                op.get("responses", {}).pop("422", None)  # schema errors are 400 here
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi
