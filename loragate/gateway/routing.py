"""Model routing: which base or adapter a request's `model` names, as the caller's key may see it,
and whether the prompt and completion fit the model's context."""
from __future__ import annotations

from dataclasses import dataclass

from loragate.gateway.auth import Principal
from loragate.gateway.errors import bad_request, model_not_found


@dataclass(frozen=True)
class ModelTarget:
    requested: str  # echoed back in responses
    adapter: str | None  # None = the base model
    label: str  # metrics label


def resolve_model(engine, principal: Principal, name: str) -> ModelTarget:
    """`name` is the base's served name, an adapter name, or `BASE:ADAPTER`. A key never learns
    whether an adapter it may not use exists: both cases are the same 404."""
    base = engine.model_name
    if name == base:
        if not principal.base:
            raise model_not_found(name)
        return ModelTarget(name, None, base)
    adapter = name
    if ":" in name:
        prefix, _, adapter = name.partition(":")
        if prefix != base or not adapter:
            raise model_not_found(name)
    if not principal.can_use_adapter(adapter) or not engine.has_adapter(adapter):
        raise model_not_found(name)
    return ModelTarget(name, adapter, adapter)


def check_context(engine, n_prompt: int, max_tokens: int, param: str) -> None:
    if n_prompt + max_tokens > engine.max_model_len:
        raise bad_request(
            f"This model's maximum context length is {engine.max_model_len} tokens. However, you requested "
            f"{n_prompt + max_tokens} tokens ({n_prompt} in the {param}, {max_tokens} in the completion). "
            "Please reduce the length of the prompt or max_tokens.",
            param, "context_length_exceeded")
