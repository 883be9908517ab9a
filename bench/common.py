"""Shared helpers of the benchmark scripts: cached random checkpoints and timing."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

CACHE = Path(os.environ.get("LORAGATE_BENCH_CACHE", Path(__file__).resolve().parent.parent / ".bench_cache"))


def smollm_checkpoint(dtype: str = "bfloat16", full_vocab_tokenizer: bool = False) -> Path:
    """A random checkpoint of SmolLM-135M's shape (built once, then reused). With
    `full_vocab_tokenizer`, its tokenizer names every one of the model's 49152 ids (see
    `build_tokenizer_cached`), so every generated token decodes to text, as with a real model: what
    a served benchmark needs, since the server streams a chunk per token that has text."""
    from loragate.testing import SMOLLM_135M, build_checkpoint

    vocab = 49152
    out = CACHE / f"smollm135m-v{vocab}-{dtype}{'-fullvocab' if full_vocab_tokenizer else ''}"
    if not (out / "config.json").exists():
        tok = build_tokenizer_cached(vocab if full_vocab_tokenizer else None)
        build_checkpoint(out, SMOLLM_135M, dtype=dtype, tokenizer_dir=tok, model_vocab_size=vocab)
    return out


def build_tokenizer_cached(vocab_size: int | None = None) -> Path:
    """The test suite's small byte-level BPE tokenizer; with `vocab_size`, extended to that many
    ids by pseudo-words (" kavo", " trelim", ...) that decode to text but that no merge produces
    (the benchmarks feed token ids, so encoding never needs them)."""
    import json
    import random
    import shutil

    from loragate.testing import build_tokenizer

    base = CACHE / "tokenizer"
    if not (base / "tokenizer.json").exists():
        build_tokenizer(base)
    if vocab_size is None:
        return base
    out = CACHE / f"tokenizer-v{vocab_size}"
    if not (out / "tokenizer.json").exists():
        tmp = out.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(base, tmp)
        spec = json.loads((tmp / "tokenizer.json").read_text())
        vocab = spec["model"]["vocab"]
        rng = random.Random(0)
        syllables = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"] + ["an", "el", "is", "or", "um"]
        next_id = max(vocab.values()) + 1
        while next_id < vocab_size:
            word = "\u0120" + "".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))  # \u0120: a space
            if word not in vocab:
                vocab[word] = next_id
                next_id += 1
        (tmp / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
        tmp.rename(out)
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


def save_figure(fig, path: Path) -> None:
    """Lay out and write a matplotlib figure as PNG (the README's pictures), creating its folder."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
