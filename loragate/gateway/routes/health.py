"""GET /health: 200 while the engine's step loop runs, 503 once it has died (no auth, for probes)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from loragate.gateway.context import get_ctx

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    if get_ctx(request).engine.is_alive:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "error", "error": {"message": "engine is not running", "type": "server_error",
                                                      "param": None, "code": "engine_dead"}}, status_code=503)
