"""vLLM-named series on `/metrics`, for Kubernetes inference gateways.

The Gateway API Inference Extension's endpoint picker (and llm-d, which builds on it) routes by
scraping each model server's Prometheus endpoint in vLLM's names (its "model server protocol"):
queue length, running requests, KV-cache usage, and one `vllm:lora_requests_info` series whose
labels say which adapters are loaded, which ones queued requests wait for, and how many fit.
Exporting them lets a loragate pod sit in an InferencePool beside vLLM pods, LoRA affinity included.

Semantics (as vLLM and the protocol define them):
- `vllm:num_requests_running` / `vllm:num_requests_waiting`: requests in the running batch / queued.
- `vllm:kv_cache_usage_perc`: used KV blocks / all KV blocks, 0..1 (1 = full).
- `vllm:lora_requests_info{running_lora_adapters, waiting_lora_adapters, max_lora}`: one series;
  running = adapters resident in device slots (ready to serve), waiting = adapters that queued
  requests need and that are not resident, max_lora = device slot count; the value is the Unix time
  of the update, so a scraper can tell the newest series (vLLM keeps old label sets around; we
  replace the series each scrape instead, so there is only ever one).
- `vllm:cache_config_info{block_size, num_gpu_blocks}`: value 1, the KV cache's shape in labels
  (`num_gpu_blocks` is the block count on whichever device the cache lives).
The gauges carry vLLM's `model_name` label (the served base model's name).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

from loragate.engine.outputs import EngineStats, LoraState


class VllmMetrics:
    """The vLLM-named series on a gateway's registry, sampled from the engine at scrape time."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.running = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                             ["model_name"], registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                             ["model_name"], registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                              ["model_name"], registry=r)
        self.lora_info = Gauge("vllm:lora_requests_info", "Running stats on lora requests.",
                               ["running_lora_adapters", "waiting_lora_adapters", "max_lora"], registry=r)
        self.cache_info = Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                                ["block_size", "num_gpu_blocks"], registry=r)

    def observe(self, model_name: str, stats: EngineStats, lora: LoraState, block_size: int) -> None:
        self.running.labels(model_name).set(stats.running)
        self.waiting.labels(model_name).set(stats.waiting)
        total = stats.kv_blocks_total
        self.kv_usage.labels(model_name).set(stats.kv_blocks_used / total if total else 0.0)
        self.lora_info.clear()
        self.lora_info.labels(",".join(lora.running), ",".join(lora.waiting), str(lora.max_loras)).set_to_current_time()
        self.cache_info.clear()
        self.cache_info.labels(str(block_size), str(total)).set(1)

    async def observe_engine(self, engine) -> None:
        """Sample the engine (anything with the gateway's engine interface) at scrape time."""
        self.observe(engine.model_name, engine.stats(), await engine.lora_state(), engine.block_size)
