"""Prometheus metrics on a per-app CollectorRegistry (several apps in one test process must not
share or collide on the global registry).

Request-level series are observed by the routes as outputs stream; engine-level gauges (running,
waiting, KV usage, adapter tiers) are sampled from `engine.stats()` / `list_adapters()` at scrape
time, so they never go stale and the gateway holds no background task for them.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from loragate.gateway.vllm_metrics import VllmMetrics

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
TIERS = ("device", "cpu", "disk", "loading", "failed")


class GatewayMetrics:
    """All series the gateway exports, with the names documented in the README."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("loragate_requests", "HTTP requests by model and outcome status",
                                ["model", "status"], registry=r)
        self.ttft = Histogram("loragate_time_to_first_token_seconds", "Arrival to first generated token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("loragate_inter_token_latency_seconds", "Time between successive outputs",
                             ["model"], buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("loragate_e2e_request_latency_seconds", "Arrival to last token",
                             ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("loragate_queue_time_seconds", "Time waiting in the engine queue",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("loragate_num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("loragate_num_requests_waiting", "Requests waiting to be scheduled", registry=r)
        self.kv_usage = Gauge("loragate_kv_cache_usage_ratio", "Fraction of KV blocks in use", registry=r)
        self.kv_used = Gauge("loragate_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_total = Gauge("loragate_kv_blocks_total", "KV cache blocks in total", registry=r)
        self.alive = Gauge("loragate_engine_alive", "1 while the engine step loop runs", registry=r)
        self.prompt_tokens = Counter("loragate_prompt_tokens", "Prompt tokens processed", ["adapter"],
                                     registry=r)
        self.generation_tokens = Counter("loragate_generation_tokens", "Tokens generated", ["adapter"],
                                         registry=r)
        self.adapter_requests = Counter("loragate_adapter_requests", "Engine requests finished per adapter",
                                        ["adapter"], registry=r)
        self.adapter_tier = Gauge("loragate_adapter_tier", "1 for the tier each adapter currently sits in",
                                  ["adapter", "tier"], registry=r)
        self.adapter_load_seconds = Gauge("loragate_adapter_load_seconds", "Duration of the adapter's last load",
                                          ["adapter"], registry=r)
        self.vllm = VllmMetrics(r)  # the endpoint picker's names (Gateway API Inference Extension)
        self.adapter_slots = Gauge("loragate_adapter_slots_total",
                                   "Adapter slots on the device (--max-loras, or what auto sized from memory)",
                                   registry=r)
        self.adapter_slots_used = Gauge("loragate_adapter_slots_used", "Adapter slots holding an adapter",
                                        registry=r)
        # prefix cache: engine totals, turned into counters by the increase since the last scrape
        self.prefix_queries = Counter("loragate_prefix_cache_queries", "Prompt tokens looked up in the prefix "
                                      "cache", registry=r)
        self.prefix_hits = Counter("loragate_prefix_cache_hits", "Prompt tokens found in the prefix cache "
                                   "(not prefilled again)", registry=r)
        self.prefix_blocks = Gauge("loragate_prefix_cache_blocks", "KV blocks holding cached prefixes "
                                   "(in use or reclaimable)", registry=r)
        self._prefix_seen = (0, 0)

    def observe_engine(self, engine) -> None:
        """Sample engine-level gauges; tolerate a dead engine (its stats are still readable)."""
        s = engine.stats()
        self.running.set(s.running)
        self.waiting.set(s.waiting)
        self.kv_used.set(s.kv_blocks_used)
        self.kv_total.set(s.kv_blocks_total)
        self.kv_usage.set(s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0)
        self.alive.set(1 if engine.is_alive else 0)
        seen_q, seen_h = self._prefix_seen
        self.prefix_queries.inc(max(0, s.prefix_cache_queries - seen_q))
        self.prefix_hits.inc(max(0, s.prefix_cache_hits - seen_h))
        self._prefix_seen = (max(s.prefix_cache_queries, seen_q), max(s.prefix_cache_hits, seen_h))
        self.prefix_blocks.set(s.prefix_cache_blocks)
        self.adapter_tier.clear()
        self.adapter_load_seconds.clear()
        adapters = engine.list_adapters()
        self.adapter_slots.set(getattr(s, "lora_slots", 0))
        self.adapter_slots_used.set(sum(1 for a in adapters if a.tier == "device"))
        for a in adapters:
            for tier in TIERS:
                self.adapter_tier.labels(a.name, tier).set(1 if a.tier == tier else 0)
            if a.last_load_seconds is not None:
                self.adapter_load_seconds.labels(a.name).set(a.last_load_seconds)

    def forget_adapter(self, name: str) -> None:
        """Drop every series labelled with a deleted adapter, so that adapter churn (register,
        serve, delete, under ever new names) cannot grow the registry without bound."""
        for metric in (self.requests, self.ttft, self.itl, self.e2e, self.queue_time, self.prompt_tokens,
                       self.generation_tokens, self.adapter_requests, self.adapter_load_seconds):
            for labels in list(getattr(metric, "_metrics", {})):
                if labels and labels[0] == name:
                    metric.remove(*labels)

    def render(self) -> bytes:
        return generate_latest(self.registry)
