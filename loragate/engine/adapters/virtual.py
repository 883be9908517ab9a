"""Adapters that are not a registered local directory: a remote one (hub, s3) or a merge of others.

Each is a frozen specification with a deterministic engine name, registered in the
`AdapterRegistry` beside the local names. From then on the engine treats it like any adapter:
requests carry the name, the scheduler asks the cache for a slot, and the cache's loader thread
builds the weights (`build`): fetch + load for a remote adapter, load the parts + merge for a
merged one. So a download or a merge runs once per name however many requests wait for it, off
the step loop, and the result is kept in the CPU tier's LRU like any other adapter.

Names: `hub:org/name`, `s3://bucket/prefix` (plus `#<token digest>` when the request brought its own
credentials, so an adapter fetched with one caller's token is never served to a caller without
it) and `merge:<digest of the specification>`.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loragate.engine.adapters.merge import MergeParams, merge_adapters
from loragate.engine.adapters.peft_loader import BaseModelInfo, LoadedAdapter, load_peft_adapter
from loragate.engine.adapters.sources import (
    REMOTE_SOURCES,
    SourceSettings,
    check_hub_id,
    fetch_hub,
    fetch_s3,
    parse_s3_url,
)
from loragate.engine.errors import AdapterLoadError

MAX_MERGED = 16  # adapters in one merge


@dataclass(frozen=True)
class RemoteAdapter:
    source: str  # hub | s3
    ref: str  # repo id or s3:// URL
    settings: SourceSettings = field(repr=False, compare=False)
    token: str | None = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        base = self.ref if self.source == "s3" else f"{self.source}:{self.ref}"
        if self.token:
            base += "#" + hashlib.sha256(self.token.encode()).hexdigest()[:12]
        return base

    def signature(self, now: float) -> tuple:
        """Changes every `retry_seconds`: a failed download is tried again after that, not before."""
        return ("remote", self.name, int(now // max(self.settings.retry_seconds, 1e-3)))

    def fetch(self) -> Path:
        if self.source == "hub":
            return fetch_hub(self.ref, self.token, self.settings)
        return fetch_s3(self.ref, self.settings)


@dataclass(frozen=True)
class MergedAdapter:
    components: tuple[str, ...]  # engine names (local, remote or merged)
    weights: tuple[float, ...]
    params: MergeParams

    def spec(self) -> dict:
        p = self.params
        return {"ids": list(self.components), "weights": list(self.weights), "merge_strategy": p.strategy,
                "density": p.density, "majority_sign_method": p.majority_sign_method}

    @property
    def spec_digest(self) -> str:
        return hashlib.sha256(json.dumps(self.spec(), sort_keys=True).encode()).hexdigest()

    @property
    def name(self) -> str:
        return "merge:" + self.spec_digest[:24]


VirtualAdapter = RemoteAdapter | MergedAdapter


def remote_adapter(source: str, ref: str, settings: SourceSettings, token: str | None = None) -> RemoteAdapter:
    """Validate a remote reference (ValueError naming the problem) and build its spec."""
    if source not in REMOTE_SOURCES:
        raise ValueError(f"adapter_source must be one of local, {', '.join(REMOTE_SOURCES)}, got {source!r}")
    if source not in settings.enabled:
        raise PermissionError(f"adapter_source {source!r} is not enabled on this server "
                              f"(enabled: {', '.join(settings.enabled)})")
    if source == "hub":
        check_hub_id(ref)
    else:
        parse_s3_url(ref)
    return RemoteAdapter(source, ref, settings, token or None)


def merged_adapter(components: list[str], weights: list[float], strategy: str | None, density: float | None,
                   majority_sign_method: str | None) -> MergedAdapter:
    """Validate a merge request's shape (ValueError naming the field) and build its spec; whether
    the named adapters exist is the caller's check."""
    if not components:
        raise ValueError("merged_adapters.ids must name at least one adapter")
    if len(components) > MAX_MERGED:
        raise ValueError(f"merged_adapters.ids may name at most {MAX_MERGED} adapters")
    if len(weights) != len(components):
        raise ValueError(f"merged_adapters has {len(components)} ids but {len(weights)} weights")
    params = MergeParams(strategy or "linear", 1.0 if density is None else float(density),
                         majority_sign_method or "total")
    params.validate()
    spec = MergedAdapter(tuple(components), tuple(float(w) for w in weights), params)
    seed = int.from_bytes(bytes.fromhex(spec.spec_digest[:16]), "big") >> 1
    return MergedAdapter(spec.components, spec.weights, MergeParams(params.strategy, params.density,
                                                                    params.majority_sign_method, seed))


def build(spec: VirtualAdapter, name: str, base: BaseModelInfo, max_rank: int,
          component: Callable[[str], LoadedAdapter]) -> LoadedAdapter:
    """The adapter's weights (blocking: runs on the cache's loader thread). `component(name)`
    returns a part of a merge, from the CPU tier or freshly loaded. Raises AdapterLoadError."""
    if isinstance(spec, RemoteAdapter):
        path = spec.fetch()
        # a hub snapshot's files are links into the repo cache folder's blobs/ (two levels up)
        boundary = path.parent.parent if spec.source == "hub" else None
        return load_peft_adapter(path, name, base, max_rank, boundary=boundary)
    parts = [component(c) for c in spec.components]
    h = hashlib.sha256(json.dumps(spec.spec(), sort_keys=True).encode())
    for p in parts:
        h.update(f"|{p.name}:{p.digest}".encode())
    try:
        return merge_adapters(parts, list(spec.weights), spec.params, name, base.dtype, max_rank, h.hexdigest())
    except ValueError as exc:
        raise AdapterLoadError(f"merged adapter: {exc}") from None
