"""Read a Hugging Face checkpoint's safetensors (single file or sharded with an index) into the
fused parameter layout our forward pass uses.

Fusing q|k|v and gate|up at load time turns seven matmuls per layer into four, which matters on
the CPU where per-op overhead dominates small batches; LoRA follows the same grouping
(see lora.py). Pickled `.bin` checkpoints are refused: loading them executes code.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from loragate.engine import progress
from loragate.engine.model.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_dtype(cfg: ModelConfig) -> torch.dtype | None:
    """The dtype config.json names (`torch_dtype`, or `dtype` in newer files), None if none."""
    return DTYPES.get(str(cfg.torch_dtype).replace("torch.", ""))


def safetensor_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ValueError(f"{path} holds only pickled weights (.bin/.pt); loragate loads safetensors only")
    raise FileNotFoundError(f"no safetensors weights in {path}")


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint by their Hugging Face names, on the CPU (progress reported
    in bytes read, for the start-up display)."""
    tensors: dict[str, torch.Tensor] = {}
    files = safetensor_files(Path(path))
    total, done = sum(f.stat().st_size for f in files), 0
    progress.report("loading weights", 0, total)
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                tensors[name] = t = f.get_tensor(name)
                done += t.numel() * t.element_size()
                progress.report("loading weights", min(done, total), total)
    progress.report("loading weights", total, total)
    return tensors


def fused_weights(cfg: ModelConfig, raw: dict[str, torch.Tensor], device: torch.device,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Map HF names to our layout: per layer `qkv`, `qkv_bias`, `o`, `gate_up`, `down`, norms."""

    def take(name: str) -> torch.Tensor:
        for prefix in ("model.", ""):
            if prefix + name in raw:
                return raw[prefix + name]
        raise KeyError(f"checkpoint is missing tensor {name!r}")

    def put(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype).contiguous()

    out: dict[str, torch.Tensor] = {"embed": put(take("embed_tokens.weight")), "norm": put(take("norm.weight"))}
    if cfg.tie_word_embeddings or "lm_head.weight" not in raw:
        out["lm_head"] = out["embed"]
    else:
        out["lm_head"] = put(raw["lm_head.weight"])
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        out[p + "qkv"] = put(torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"], dim=0))
        if cfg.attention_bias:
            out[p + "qkv_bias"] = put(torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"], dim=0))
        out[p + "o"] = put(take(p + "self_attn.o_proj.weight"))
        out[p + "gate_up"] = put(torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")], dim=0))
        out[p + "down"] = put(take(p + "mlp.down_proj.weight"))
        out[p + "input_norm"] = put(take(p + "input_layernorm.weight"))
        out[p + "post_norm"] = put(take(p + "post_attention_layernorm.weight"))
    return out
