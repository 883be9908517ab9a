"""Engine configuration: one frozen dataclass built once (from CLI flags) and passed down.

Keeping every knob in one immutable object means no module reads globals or environment variables
on its own, and a test can build an engine with exactly the limits it wants to exercise.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to start. Sizes are in bytes unless named otherwise."""

    model: str
    served_model_name: str | None = None
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    # KV cache: an explicit byte budget wins; otherwise a fraction of free device memory on CUDA,
    # and `cpu_kv_cache_memory` on the CPU (free RAM is not a safe thing to grab on a shared host).
    kv_cache_memory: int | None = None
    gpu_memory_fraction: float = 0.5
    cpu_kv_cache_memory: int = 1 << 30
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    max_queue_len: int = 4096
    # LoRA
    max_loras: int | str = "auto"  # device slots: a count, or "auto" (sized by memory, adapters/slots.py)
    max_lora_rank: int = 64
    max_cpu_adapter_memory: int = 2 << 30
    adapters: tuple[tuple[str, str], ...] = ()
    adapter_dir: str | None = None
    allowed_adapter_dirs: tuple[str, ...] = ()  # where the admin API may register adapters from
    pin_adapters: tuple[str, ...] = ()
    enable_lora: bool = True
    # remote adapter sources (engine/adapters/sources.py): which are on, where downloads go, limits
    adapter_sources: tuple[str, ...] = ("local",)
    adapter_cache_dir: str | None = None
    hf_cache_dir: str | None = None
    max_adapter_download_bytes: int = 1 << 30
    adapter_download_timeout: float = 300.0
    s3_endpoint_url: str | None = None
    # scheduling
    fairness: str = "vtc"  # vtc | fcfs
    tenant_weights: tuple[tuple[str, float], ...] = field(default_factory=tuple)
    seed: int = 0
    # adapter slots sized by memory (--max-loras auto) and the kernels' start-up self-check
    adapter_memory_fraction: float = 0.1  # of the device memory left after the weights
    lora_target_modules: str | tuple[str, ...] = "auto"  # auto | all | PEFT module names the slots hold
    lora_kernels: str = "auto"  # auto: self-checked fast kernels | torch: the torch path everywhere
    # automatic prefix caching: requests reuse the computed KV blocks of earlier ones with the same
    # leading tokens and the same adapter content (see prefix_cache.py)
    enable_prefix_caching: bool = True
