"""GET /health: 200 while the engine's step loop runs, 503 once it has died (no auth, for probes).
The 200 body also says what the engine runs on: device, compute dtype and why it was chosen, the
CPU's vector extensions and the native kernels' path (see loragate.engine.host)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from loragate.gateway.context import get_ctx

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    engine = get_ctx(request).engine
    if engine.is_alive:
        return JSONResponse({"status": "ok", **getattr(engine, "host_info", {})})
    return JSONResponse({"status": "error", "error": {"message": "engine is not running", "type": "server_error",
                                                      "param": None, "code": "engine_dead"}}, status_code=503)
