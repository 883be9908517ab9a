"""Shared helpers of the benchmark scripts: cached random checkpoints and timing."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

CACHE = Path(os.environ.get("LORAGATE_BENCH_CACHE", Path(__file__).resolve().parent.parent / ".bench_cache"))


def smollm_checkpoint(dtype: str = "bfloat16") -> Path:
    """A random checkpoint of SmolLM-135M's shape (built once, then reused)."""
    from loragate.testing import SMOLLM_135M, build_checkpoint

    out = CACHE / f"smollm135m-{dtype}"
    if not (out / "config.json").exists():
        tok = build_tokenizer_cached()
        build_checkpoint(out, SMOLLM_135M, dtype=dtype, tokenizer_dir=tok, vocab_size=49152)
    return out


def build_tokenizer_cached() -> Path:
    from loragate.testing import build_tokenizer

    out = CACHE / "tokenizer-49152"
    if not (out / "tokenizer.json").exists():
        build_tokenizer(out, vocab_size=49152)
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {dev}"


def timeit(fn, iters: int, warmup: int = 2, sync=None) -> float:
    """Mean seconds per call."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    if sync:
        sync()
    return (time.perf_counter() - t) / iters
