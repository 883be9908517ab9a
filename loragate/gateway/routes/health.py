"""GET /health: 200 while the engine's step loop runs, 503 once it has died or the server is draining
for shutdown (no auth, for probes: a load balancer stops sending traffic at once)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from loragate.gateway.context import get_ctx
from loragate.gateway.openapi import HealthStatus

router = APIRouter()


@router.get("/health", responses={200: {"model": HealthStatus}, 503: {"model": HealthStatus,
                                   "description": "Draining for shutdown, or the engine is not running"}})
async def health(request: Request) -> JSONResponse:
    ctx = get_ctx(request)
    if ctx.draining:
        return JSONResponse({"status": "draining", "error": {"message": "the server is shutting down",
                                                             "type": "server_error", "param": None,
                                                             "code": "server_shutting_down"}}, status_code=503)
    if ctx.engine.is_alive:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "error", "error": {"message": "engine is not running", "type": "server_error",
                                                      "param": None, "code": "engine_dead"}}, status_code=503)
