"""Which adapter a request runs on when it names one the LoRAX way: `adapter_id` with an
`adapter_source` (local, hub, s3), or `merged_adapters`. Used by LoRAX's routes and, as extra body
fields, by the OpenAI routes, so the same access rules hold on both:

- a local name is visible only to keys whose `adapters` allow it (else the same 404 as an unknown
  name: a key never learns what exists);
- a remote adapter needs its source enabled on the server (`--adapter-source`) and allowed for the
  key (`sources` in the keys file); the request's `api_token` is used for that download only and
  never taken from the Authorization header (that is our API key, not the caller's HF token);
- a merge needs every part allowed, by the same rules.

No I/O happens here: the engine registers the remote or merged adapter by name and its loader
fetches or builds it when the request is scheduled.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from loragate.engine.errors import AdapterLoadError, AdapterNotFoundError
from loragate.gateway.auth import Principal
from loragate.gateway.errors import APIError, bad_request, model_not_found
from loragate.gateway.routing import ModelTarget, resolve_model


class MergedAdaptersBody(BaseModel):
    """LoRAX's `merged_adapters` object."""

    model_config = ConfigDict(extra="ignore")
    ids: list[str]
    weights: list[float] = []
    merge_strategy: str | None = None
    density: float | None = None
    majority_sign_method: str | None = None


@dataclass(frozen=True)
class AdapterAsk:
    """An adapter choice in LoRAX's terms; `prefix` is prepended to field names in errors."""

    adapter_id: str | None = None
    source: str | None = None
    merged: MergedAdaptersBody | None = None
    api_token: str | None = None
    prefix: str = ""


def _source_of(ask: AdapterAsk, ref: str) -> str:
    """LoRAX's default source is the hub; ours is local for plain names (they cannot contain '/'),
    s3 for s3:// URLs, and the hub for `org/name`."""
    if ask.source:
        return ask.source
    if ref.startswith("s3://"):
        return "s3"
    return "hub" if "/" in ref else "local"


def _one(engine, principal: Principal, ask: AdapterAsk, ref: str, field: str) -> str:
    """The engine name of adapter `ref` from its source, with every access rule applied."""
    source = _source_of(ask, ref)
    if source == "local":
        if not principal.can_use_adapter(ref) or not engine.has_adapter(ref):
            raise model_not_found(ref)
        return ref
    if source not in ("hub", "s3"):
        raise bad_request(f"adapter_source must be one of local, hub, s3, got {source!r}",
                          ask.prefix + "adapter_source")
    if source not in getattr(engine, "adapter_sources", ("local",)):
        raise bad_request(f"adapter_source {source!r} is not enabled on this server (start it with "
                          f"--adapter-source local,{source})", ask.prefix + "adapter_source", "source_disabled")
    if not principal.can_use_source(source):
        raise APIError(403, f"this API key may not use adapters from {source!r}", "permission_error",
                       ask.prefix + "adapter_source", "forbidden")
    try:
        return engine.remote_adapter(source, ref, ask.api_token)
    except PermissionError as exc:
        raise bad_request(str(exc), ask.prefix + "adapter_source", "source_disabled") from None
    except (ValueError, AdapterLoadError) as exc:
        raise bad_request(str(exc), field) from None


def select_adapter(engine, principal: Principal, ask: AdapterAsk, requested: str) -> ModelTarget:
    """The ModelTarget for `ask`; APIError (400/403/404) naming the field otherwise."""
    if ask.merged is not None:
        if ask.adapter_id:
            raise bad_request("give at most one of adapter_id and merged_adapters", ask.prefix + "merged_adapters")
        m = ask.merged
        names = [_one(engine, principal, ask, ref, f"{ask.prefix}merged_adapters.ids[{i}]")
                 for i, ref in enumerate(m.ids)]
        try:
            name = engine.merged_adapter(names, m.weights, m.merge_strategy, m.density, m.majority_sign_method)
        except AdapterNotFoundError as exc:
            raise bad_request(str(exc), ask.prefix + "merged_adapters.ids") from None
        except ValueError as exc:
            msg = str(exc)
            field = next((f for f in ("ids", "weights", "merge_strategy", "density", "majority_sign_method")
                          if f in msg), None)
            raise bad_request(msg, ask.prefix + "merged_adapters" + (f".{field}" if field else "")) from None
        return ModelTarget(requested, name, "merged")
    if not ask.adapter_id:
        if not principal.base:
            raise model_not_found(engine.model_name)
        return ModelTarget(requested, None, engine.model_name)
    name = _one(engine, principal, ask, ask.adapter_id, ask.prefix + "adapter_id")
    return ModelTarget(requested, name, ask.adapter_id)


def resolve_request_model(engine, principal: Principal, req: Any) -> ModelTarget:
    """The OpenAI routes' target: `model` as usual, or with the extra body fields `adapter_source`
    (+ `api_token`), where `model` is the remote adapter's id, or `merged_adapters`, where `model`
    names the base model the merge applies to."""
    extra = req.model_extra or {}
    merged, source = extra.get("merged_adapters"), extra.get("adapter_source")
    if merged is None and not source:
        return resolve_model(engine, principal, req.model)
    token = extra.get("api_token")
    if token is not None and not isinstance(token, str):
        raise bad_request("api_token must be a string", "api_token")
    if source is not None and not isinstance(source, str):
        raise bad_request("adapter_source must be a string", "adapter_source")
    if merged is None:
        return select_adapter(engine, principal, AdapterAsk(req.model, source, None, token), req.model)
    if req.model != engine.model_name:
        raise bad_request(f"with merged_adapters, model must name the base model {engine.model_name!r}", "model")
    try:
        body = MergedAdaptersBody.model_validate(merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise bad_request(f"merged_adapters.{where}: {first.get('msg')}", f"merged_adapters.{where}") from None
    return select_adapter(engine, principal, AdapterAsk(None, source, body, token), req.model)
