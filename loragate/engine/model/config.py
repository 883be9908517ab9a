"""The base model's shape, read from a Hugging Face config.json.

Only Llama-family decoders are served: Llama 2/3, TinyLlama, Mistral and Qwen2 share one forward
pass and differ in a handful of fields captured here. Anything else is refused up front with a
message naming the architecture, rather than failing later with a shape error.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


class UnsupportedModelError(ValueError):
    """The checkpoint is not a Llama-family decoder we can run."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family checkpoint."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # qkv bias (Qwen2)
    mlp_bias: bool
    torch_dtype: str | None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    bos_token_id: int | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
        raw = json.loads(cfg_file.read_text())
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedModelError(
                f"unsupported architecture {archs or raw.get('model_type')!r}: loragate serves "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        model_type = SUPPORTED_ARCHITECTURES[arch]
        if model_type == "mistral" and raw.get("sliding_window") and raw.get("use_sliding_window", True):
            max_pos = raw.get("max_position_embeddings", 4096)
            if raw["sliding_window"] < max_pos:
                # Serving contexts longer than the window would need windowed attention; we cap the
                # context at the window instead of silently attending past it (done in max_model_len).
                pass
        if model_type == "qwen2" and raw.get("use_sliding_window"):
            raise UnsupportedModelError("Qwen2 with use_sliding_window=true is not supported")
        heads = raw["num_attention_heads"]
        hidden = raw["hidden_size"]
        head_dim = raw.get("head_dim") or hidden // heads
        rope_scaling = raw.get("rope_scaling")
        rope_theta = raw.get("rope_theta", 10000.0)
        # transformers 5 may fold rope settings into `rope_parameters`.
        rp = raw.get("rope_parameters")
        if isinstance(rp, dict):
            rope_theta = rp.get("rope_theta", rope_theta)
            rtype = rp.get("rope_type", rp.get("type", "default"))
            if rtype not in (None, "default"):
                rope_scaling = dict(rp)
        if rope_scaling is not None:
            rtype = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if rtype in (None, "default"):
                rope_scaling = None
            elif rtype not in ("linear", "llama3"):
                raise UnsupportedModelError(f"unsupported rope_scaling type {rtype!r} (supported: linear, llama3)")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            architecture=arch,
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", model_type == "qwen2" and False)),
            attention_bias=bool(raw.get("attention_bias", model_type == "qwen2")),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            eos_token_ids=eos_ids,
            bos_token_id=raw.get("bos_token_id"),
        )
