"""GET /v1/models and /v1/models/{id}: the base model and the adapters the key may use."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from loragate.gateway.auth import Principal
from loragate.gateway.context import authenticate, get_ctx
from loragate.gateway.errors import model_not_found
from loragate.gateway.openapi import error_responses
from loragate.gateway.protocol import ModelCard, ModelList
from loragate.gateway.routing import resolve_model

router = APIRouter()


def _cards(request: Request, principal: Principal) -> list[ModelCard]:
    ctx = get_ctx(request)
    engine, created = ctx.engine, request.app.state.created
    base = engine.model_name
    cards = []
    if principal.base:
        cards.append(ModelCard(id=base, created=created, root=base, max_model_len=engine.max_model_len))
    for a in engine.list_adapters():
        if principal.can_use_adapter(a.name):
            cards.append(ModelCard(id=a.name, created=created, parent=base, root=a.name,
                                   max_model_len=engine.max_model_len))
    return cards


@router.get("/v1/models", responses=error_responses(401))
async def list_models(request: Request, principal: Principal = Depends(authenticate)) -> ModelList:
    return ModelList(data=_cards(request, principal))


@router.get("/v1/models/{model_id:path}", responses=error_responses(401, 404))
async def retrieve_model(model_id: str, request: Request, principal: Principal = Depends(authenticate)) -> ModelCard:
    target = resolve_model(get_ctx(request).engine, principal, model_id)
    for card in _cards(request, principal):
        if card.id == (target.adapter or target.requested):
            return card
    if target.adapter is not None:  # usable but not listed yet (discovered in --adapter-dir on use)
        engine = get_ctx(request).engine
        return ModelCard(id=target.adapter, created=request.app.state.created, parent=engine.model_name,
                         max_model_len=engine.max_model_len)
    raise model_not_found(model_id)
