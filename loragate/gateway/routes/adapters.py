"""Adapter management (admin keys only): list with tier/size/requests, register from an allowed
directory, delete (waits for the adapter's running requests, then frees it)."""
from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter, Depends, Request

from loragate.gateway.auth import Principal
from loragate.gateway.context import authenticate, get_ctx, parse_body
from loragate.gateway.errors import (
    APIError,
    bad_request,
    from_engine_error,
    model_not_found,
)
from loragate.gateway.openapi import AdapterCard, AdapterDeleted, AdapterList, error_responses, json_body
from loragate.gateway.protocol import RegisterAdapterRequest

router = APIRouter()


def forbidden() -> APIError:
    """403 for a key without the right: no detail on what exists or why (admin routes, metrics)."""
    return APIError(403, "Forbidden.", "permission_error", None, "forbidden")


async def require_admin(principal: Principal = Depends(authenticate)) -> Principal:
    if not principal.admin:
        raise forbidden()
    return principal


def _card(a) -> dict:
    return {"id": a.name, "object": "adapter", "path": a.path, "tier": a.tier, "size_bytes": a.size_bytes,
            "rank": a.rank, "requests_served": a.requests_served, "load_count": a.load_count,
            "last_load_seconds": a.last_load_seconds, "pinned": a.pinned, "error": a.error}


def allowed_path(path: str, allowed_dirs: tuple[str, ...]) -> str:
    """Resolve symlinks and '..' first, then require the result to sit inside an allowed dir."""
    if not allowed_dirs:
        raise APIError(403, "adapter registration is disabled: no --allowed-adapter-dir configured",
                       "permission_error", "path", "forbidden")
    try:
        real = Path(os.path.realpath(path))
    except (ValueError, OSError):  # e.g. an embedded NUL byte
        raise bad_request("path is not a valid filesystem path", "path", "invalid_path") from None
    for d in allowed_dirs:
        root = Path(os.path.realpath(d))
        if real == root or root in real.parents:
            return str(real)
    raise APIError(403, "path is outside the allowed adapter directories", "permission_error", "path", "forbidden")


@router.get("/v1/adapters", responses={200: {"model": AdapterList}, **error_responses(401, 403)})
async def list_adapters(request: Request, _: Principal = Depends(require_admin)) -> dict:
    engine = get_ctx(request).engine
    adapters = engine.list_adapters()
    # device slots: how many (--max-loras, or what `auto` sized from memory) and how many hold an adapter
    slots = {"total": getattr(engine.stats(), "lora_slots", 0), "used": sum(1 for a in adapters if a.tier == "device")}
    return {"object": "list", "data": [_card(a) for a in adapters], "slots": slots}


@router.post("/v1/adapters", openapi_extra=json_body(RegisterAdapterRequest),
             responses={200: {"model": AdapterCard}, **error_responses(400, 401, 403, 409, 413)})
async def register_adapter(request: Request, _: Principal = Depends(require_admin)) -> dict:
    ctx = get_ctx(request)
    body = await parse_body(request, RegisterAdapterRequest)
    if body.name == ctx.engine.model_name or ctx.engine.has_adapter(body.name):
        raise APIError(409, f"a model named {body.name!r} already exists", "invalid_request_error", "name",
                       "adapter_exists")
    path = allowed_path(body.path, ctx.settings.allowed_adapter_dirs)
    if not Path(path).is_dir():
        raise bad_request("no adapter directory at the given path", "path", "adapter_not_found")
    try:
        stats = ctx.engine.register_adapter(body.name, path)
    except Exception as exc:
        mapped = from_engine_error(exc)
        if mapped is None:
            raise
        raise mapped from None
    return _card(stats)


@router.delete("/v1/adapters/{name}", responses={200: {"model": AdapterDeleted}, **error_responses(401, 403, 404)})
async def delete_adapter(name: str, request: Request, _: Principal = Depends(require_admin)) -> dict:
    engine = get_ctx(request).engine
    if not engine.has_adapter(name):
        raise model_not_found(name)
    try:
        await engine.unregister_adapter(name)
    except Exception as exc:
        mapped = from_engine_error(exc)
        if mapped is None:
            raise
        raise mapped from None
    get_ctx(request).metrics.forget_adapter(name)
    return {"id": name, "object": "adapter", "deleted": True}
