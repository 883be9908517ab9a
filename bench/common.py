"""Shared helpers of the benchmark scripts: cached random checkpoints and timing."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

CACHE = Path(os.environ.get("LORAGATE_BENCH_CACHE", Path(__file__).resolve().parent.parent / ".bench_cache"))


def smollm_checkpoint(dtype: str = "bfloat16") -> Path:
    """A random checkpoint of SmolLM-135M's shape (built once, then reused)."""
    from loragate.testing import SMOLLM_135M, build_checkpoint

    out = CACHE / f"smollm135m-v49152-{dtype}"
    if not (out / "config.json").exists():
        tok = build_tokenizer_cached()
        build_checkpoint(out, SMOLLM_135M, dtype=dtype, tokenizer_dir=tok, model_vocab_size=49152)
    return out


def build_tokenizer_cached() -> Path:
    from loragate.testing import build_tokenizer

    out = CACHE / "tokenizer"
    if not (out / "tokenizer.json").exists():
        build_tokenizer(out)
    return out


def machine() -> str:
    """The header every bench script prints: CPU model, its vector extensions (AVX2, AVX-512,
    AVX-512 BF16, AMX: what decides the fast dtype and the native kernels' path), cores, torch,
    GPU. Results from hosts that differ here are not comparable."""
    from loragate.engine import host

    info = host.detect()
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{info.cpu_model} [{info.features.extensions()}], {info.cores} cores, torch {torch.__version__} "
            f"(ATen {info.torch_capability}), {dev}")


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


def write_random_adapters(base_dir: Path, root: Path, n: int, rank: int = 8,
                          targets: tuple[str, ...] = ("q_proj", "v_proj"), dtype: str = "bfloat16",
                          seed: int = 0) -> list[Path]:
    """Write `n` PEFT-format LoRA adapters quickly (safetensors + adapter_config.json as PEFT
    writes them), without instantiating PEFT for each: a thousand adapters in seconds."""
    import json

    from safetensors.torch import save_file

    from loragate.engine.model.config import ModelConfig

    mc = ModelConfig.from_dir(base_dir)
    dims = {
        "q_proj": (mc.hidden_size, mc.q_size), "k_proj": (mc.hidden_size, mc.kv_size),
        "v_proj": (mc.hidden_size, mc.kv_size), "o_proj": (mc.q_size, mc.hidden_size),
        "gate_proj": (mc.hidden_size, mc.intermediate_size), "up_proj": (mc.hidden_size, mc.intermediate_size),
        "down_proj": (mc.intermediate_size, mc.hidden_size),
    }
    where = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
             "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "base_model_name_or_path": str(base_dir),
        "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {},
    }
    tdtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(seed)
    paths = []
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        out = root / f"adapter-{i:04d}"
        paths.append(out)
        if (out / "adapter_model.safetensors").exists():
            continue
        out.mkdir(exist_ok=True)
        tensors = {}
        for layer in range(mc.num_layers):
            for m in targets:
                fin, fout = dims[m]
                p = f"base_model.model.model.layers.{layer}.{where[m]}.{m}"
                tensors[p + ".lora_A.weight"] = (torch.randn(rank, fin, generator=g) / fin**0.5).to(tdtype)
                tensors[p + ".lora_B.weight"] = (torch.randn(fout, rank, generator=g) / rank**0.5 * 0.1).to(tdtype)
        save_file(tensors, str(out / "adapter_model.safetensors"))
        (out / "adapter_config.json").write_text(json.dumps(config))
    return paths
