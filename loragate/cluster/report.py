"""What a replica reports about itself, and how the ingress folds the reports of all replicas into
the one engine view the gateway serves (`/v1/models`, `/v1/adapters`, the engine gauges on
`/metrics`). Pure functions on dataclasses: no Ray needed, so they are tested on their own.

Aggregation rules (what `/v1/models`, `/v1/adapters` and `/metrics` mean across replicas):
- counters and gauges that count things (running, waiting, KV blocks, steps, preemptions) are
  summed; the cluster is alive while any replica is;
- an adapter's tier is the best one it has on any replica (device > loading > cpu > disk > failed);
  its requests served and loads are summed over replicas;
- `LoraState`: running = adapters resident on any replica, waiting = adapters queued requests wait
  for that are resident nowhere, max_loras = the sum of every replica's slots.
Per-replica values are exported separately by the ingress (`loragate_replica_*{replica=...}`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from loragate.engine.outputs import AdapterStats, EngineStats, LoraState

TIER_ORDER = ("device", "loading", "cpu", "disk", "failed")


@dataclass(frozen=True)
class ReplicaReport:
    """One replica's state, sent to the cluster's state board every `report_interval` seconds.

    adapters: the engine's adapter cache entries (adapters it has seen), with their tiers.
    ray_view: the adapters this replica has told Ray's router it holds (device slot, loading or
        CPU tier of the engine's cache: the two views are the same set, refreshed every report).
    """

    replica_id: str
    actor_name: str | None
    stats: EngineStats
    adapters: tuple[AdapterStats, ...]
    lora: LoraState
    ray_view: tuple[str, ...]

    @property
    def resident(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.adapters if a.tier == "device")


def aggregate_stats(reports: Iterable[ReplicaReport]) -> EngineStats:
    reports = list(reports)
    return EngineStats(
        running=sum(r.stats.running for r in reports),
        waiting=sum(r.stats.waiting for r in reports),
        kv_blocks_used=sum(r.stats.kv_blocks_used for r in reports),
        kv_blocks_total=sum(r.stats.kv_blocks_total for r in reports),
        steps=sum(r.stats.steps for r in reports),
        alive=any(r.stats.alive for r in reports),
        preemptions=sum(r.stats.preemptions for r in reports),
        lora_slots=sum(r.stats.lora_slots for r in reports),
        prefix_cache_queries=sum(r.stats.prefix_cache_queries for r in reports),
        prefix_cache_hits=sum(r.stats.prefix_cache_hits for r in reports),
        prefix_cache_blocks=sum(r.stats.prefix_cache_blocks for r in reports),
    )


def aggregate_lora(reports: Iterable[ReplicaReport]) -> LoraState:
    reports = list(reports)
    running = set().union(*(r.lora.running for r in reports))
    waiting = set().union(*(r.lora.waiting for r in reports)) - running
    return LoraState(tuple(sorted(running)), tuple(sorted(waiting)), sum(r.lora.max_loras for r in reports))


def _dir_size(path: str) -> int:
    p = Path(path)
    if not p.is_dir():
        return 0
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file())


def aggregate_adapters(names: Iterable[str], resolve: Callable[[str], str | None],
                       reports: Iterable[ReplicaReport]) -> list[AdapterStats]:
    """One `AdapterStats` per servable name (the ingress's registry decides what is servable)."""
    per_name: dict[str, list[AdapterStats]] = {}
    for r in reports:
        for a in r.adapters:
            per_name.setdefault(a.name, []).append(a)
    out = []
    for name in names:
        seen = per_name.get(name)
        if not seen:
            path = resolve(name) or ""
            out.append(AdapterStats(name, path, "disk", _dir_size(path), None, 0, 0, None))
            continue
        best = min(seen, key=lambda a: TIER_ORDER.index(a.tier) if a.tier in TIER_ORDER else len(TIER_ORDER))
        loads = [a.last_load_seconds for a in seen if a.last_load_seconds is not None]
        out.append(AdapterStats(
            name, best.path or (resolve(name) or ""), best.tier,
            max(a.size_bytes for a in seen), next((a.rank for a in seen if a.rank is not None), None),
            sum(a.requests_served for a in seen), sum(a.load_count for a in seen),
            max(loads) if loads else None, any(a.pinned for a in seen),
            best.error if best.tier == "failed" else None,
        ))
    return out
