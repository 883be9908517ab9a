"""GET /metrics: Prometheus text exposition of this app's registry.

`metrics_auth="open"` (the default, like vLLM): no key needed; the series name every adapter
that served requests or sits in a cache tier, and engine-wide load (running, waiting, KV usage).
`metrics_auth="admin"`: only admin keys may read it (other keys get a bare 403), for servers whose
adapter names are themselves confidential between tenants."""
from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from loragate.gateway.context import authenticate, get_ctx
from loragate.gateway.openapi import error_responses
from loragate.gateway.routes.adapters import forbidden

router = APIRouter()


@router.get("/metrics", response_class=Response, responses={
    200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
          "description": "Prometheus text exposition"}, **error_responses(401, 403)})
async def metrics(request: Request) -> Response:
    ctx = get_ctx(request)
    if ctx.settings.metrics_auth == "admin" and not (await authenticate(request)).admin:
        raise forbidden()
    ctx.metrics.observe_engine(ctx.engine)
    await ctx.metrics.vllm.observe_engine(ctx.engine)
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)
