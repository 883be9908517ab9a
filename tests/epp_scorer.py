"""A small endpoint picker that follows the Gateway API Inference Extension's published LoRA-affinity
rule (its `lora-affinity-scorer` plugin), fed by scraping each server's `/metrics` the way the
picker's metrics extractor does (the model server protocol's vLLM names):

  score 1.0  the adapter is in `running_lora_adapters` (already loaded on that server)
  score 0.8  len(running) + len(waiting) < `max_lora` (room to load one more)
  score 0.6  the adapter is in `waiting_lora_adapters` (already queued to load there)
  score 0.0  otherwise (full)

Highest score wins; ties go to the shorter queue (`vllm:num_requests_waiting`, the picker's queue
scorer), then to the lower KV-cache usage, then to the first server listed. The real picker weighs
several scorers and breaks exact ties at random; a deterministic tie-break keeps tests exact.
Used by tests/test_vllm_metrics.py to route real requests between two real `loragate serve`s.
"""
from __future__ import annotations

from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families


@dataclass
class PodMetrics:
    """What the picker keeps per model server after a scrape."""

    waiting_queue: int
    running_requests: int
    kv_usage: float
    active: set[str]
    waiting_adapters: set[str]
    max_active: int
    block_size: int
    num_gpu_blocks: int
    lora_series: int  # how many vllm:lora_requests_info series the server exposed


def _adapters(csv: str) -> set[str]:
    return {n.strip() for n in csv.split(",") if n.strip()}


def parse_metrics(text: str) -> PodMetrics:
    """Read the model server protocol's series from a Prometheus exposition; for the LoRA info the
    series with the newest timestamp value wins (as the picker's `getLatestMetric` does)."""
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)

    def one(name: str) -> float:
        found = samples.get(name)
        assert found, f"{name} missing from /metrics"
        return found[0].value

    lora = samples.get("vllm:lora_requests_info", [])
    assert lora, "vllm:lora_requests_info missing from /metrics"
    newest = max(lora, key=lambda s: s.value)
    cache = samples.get("vllm:cache_config_info", [])
    assert cache, "vllm:cache_config_info missing from /metrics"
    return PodMetrics(
        waiting_queue=int(one("vllm:num_requests_waiting")),
        running_requests=int(one("vllm:num_requests_running")),
        kv_usage=one("vllm:kv_cache_usage_perc"),
        active=_adapters(newest.labels["running_lora_adapters"]),
        waiting_adapters=_adapters(newest.labels["waiting_lora_adapters"]),
        max_active=int(newest.labels["max_lora"]),
        block_size=int(cache[0].labels["block_size"]),
        num_gpu_blocks=int(cache[0].labels["num_gpu_blocks"]),
        lora_series=len(lora),
    )


def lora_affinity_score(pod: PodMetrics, adapter: str) -> float:
    """The published rule, case for case."""
    if adapter in pod.active:
        return 1.0
    if len(pod.active) + len(pod.waiting_adapters) < pod.max_active:
        return 0.8
    if adapter in pod.waiting_adapters:
        return 0.6
    return 0.0


class LoraAffinityPicker:
    """Scrapes every server before each pick (the real picker refreshes every few ms)."""

    def __init__(self, urls: list[str], client: httpx.Client) -> None:
        self.urls = list(urls)
        self.client = client

    def scrape(self) -> list[PodMetrics]:
        return [parse_metrics(self.client.get(u + "/metrics").text) for u in self.urls]

    def pick(self, adapter: str) -> int:
        pods = self.scrape()
        ranked = sorted(range(len(pods)), key=lambda i: (-lora_affinity_score(pods[i], adapter),
                                                         pods[i].waiting_queue, pods[i].kv_usage, i))
        return ranked[0]
