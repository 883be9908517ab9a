"""GET /metrics: Prometheus text exposition of this app's registry (no auth, for scrapers)."""
from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from loragate.gateway.context import get_ctx

router = APIRouter()


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    ctx = get_ctx(request)
    ctx.metrics.observe_engine(ctx.engine)
    await ctx.metrics.vllm.observe_engine(ctx.engine)
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)
