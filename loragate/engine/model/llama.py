"""Our Llama-family forward pass over a flat batch.

All tokens of all sequences of a step are concatenated into one [T, hidden] tensor; positions and
KV slots travel beside them. Every projection LoRA can target is followed by one batched LoRA call
(`add_lora`) that reads the step's segment table, so tokens of many adapters and of the base model
share every matmul of the base weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loragate.engine.model.attention import AttentionMetadata, paged_attention
from loragate.engine.model.config import ModelConfig
from loragate.engine.model.linear import Linear
from loragate.engine.model.lora import LoraWeights, group_specs
from loragate.engine.model.norm import RMSNorm
from loragate.engine.model.rope import RotaryEmbedding
from loragate.kernels import add_lora
from loragate.kernels.decode_attention import use_native as use_native_attention
from loragate.kernels.elementwise import silu_mul_native
from loragate.kernels.elementwise import use_native as use_native_elementwise
from loragate.kernels.layout import LoraBatchLayout


def swiglu(gate_up: torch.Tensor, native: bool) -> torch.Tensor:
    """silu(gate) * up of the fused gate|up projection output."""
    if native:
        return silu_mul_native(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@dataclass
class ForwardBatch:
    """The model's inputs for one step."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: AttentionMetadata
    logits_rows: torch.Tensor  # [B] rows whose next-token logits are needed
    lora: LoraBatchLayout | None = None


@dataclass
class LayerWeights:
    """One decoder layer: the four (fused) projections and the two norms."""

    qkv: Linear
    o: Linear
    gate_up: Linear
    down: Linear
    input_norm: RMSNorm
    post_norm: RMSNorm

    def linears(self) -> tuple[Linear, ...]:
        return self.qkv, self.o, self.gate_up, self.down


class LlamaModel:
    """Weights plus the forward pass. Stateless apart from weights: the KV cache is passed in."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], device: torch.device,
                 dtype: torch.dtype, max_positions: int) -> None:
        self.cfg = cfg
        self.embed = weights["embed"]
        self.norm = RMSNorm(weights["norm"], cfg.rms_norm_eps)
        self.lm_head = Linear(weights["lm_head"])
        self.device = device
        self.dtype = dtype
        self.rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, device, dtype)
        self.scale = cfg.head_dim ** -0.5
        self.lora: LoraWeights | None = None
        self._slices: dict[str, tuple[int, ...]] = {}
        self.lora_specs = group_specs(cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size)
        self.layers = [self._layer_weights(weights, i, cfg.rms_norm_eps) for i in range(cfg.num_layers)]

    @staticmethod
    def _layer_weights(w: dict[str, torch.Tensor], i: int, eps: float) -> LayerWeights:
        p = f"layers.{i}."
        return LayerWeights(
            qkv=Linear(w[p + "qkv"], w.get(p + "qkv_bias")),
            o=Linear(w[p + "o"]),
            gate_up=Linear(w[p + "gate_up"]),
            down=Linear(w[p + "down"]),
            input_norm=RMSNorm(w[p + "input_norm"], eps),
            post_norm=RMSNorm(w[p + "post_norm"], eps),
        )

    def linears(self) -> list[Linear]:
        """Every matmul of a step, in order: what bench/engine.py times as the compute floor."""
        return [lin for layer in self.layers for lin in layer.linears()] + [self.lm_head]

    def attach_lora(self, lora: LoraWeights) -> None:
        self.lora = lora

    def _active_slices(self, layout: LoraBatchLayout | None) -> dict[str, tuple[int, ...]]:
        """Per group, the slices that at least one adapter of this step targets; groups no adapter
        targets are absent and skip LoRA entirely."""
        if layout is None or layout.empty or self.lora is None:
            return {}
        active: dict[str, set[int]] = {}
        for slot in {s.slot for s in layout.segments}:
            for group, idx in self.lora.slot_slices[slot]:
                active.setdefault(group, set()).add(idx)
        return {g: tuple(sorted(v)) for g, v in active.items()}

    def _proj(self, x: torch.Tensor, linear: Linear, layer: int, group: str,
              layout: LoraBatchLayout | None) -> torch.Tensor:
        y = linear(x)
        slices = self._slices.get(group)
        if slices is not None:
            spec = self.lora_specs[group]
            add_lora(y, x, self.lora.A[layer][group], self.lora.B[layer][group], spec.slice_offsets, layout, slices)
        return y

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """Logits [B, vocab] for `batch.logits_rows`, in the model's dtype: the sampler widens them
        only when it edits them (greedy argmax needs no copy of a [B, 49k] tensor)."""
        cfg = self.cfg
        T = batch.input_ids.shape[0]
        layout = batch.lora
        self._slices = self._active_slices(layout)
        h = F.embedding(batch.input_ids, self.embed)  # the residual stream, updated in place below
        # one backend for the step's row-wise ops: the native CPU kernels when they built, else torch
        native = use_native_elementwise(h)
        native_attention = use_native_attention(h)
        cos_sin = None if native else self.rope.lookup(batch.positions)
        x = self.layers[0].input_norm(h, native)
        for i, lw in enumerate(self.layers):
            qkv = self._proj(x, lw.qkv, i, "qkv", layout)
            # q|k|v per token; rotating q and k in place leaves k|v side by side, as the cache keeps them
            self.rope.apply_(qkv[:, : cfg.q_size + cfg.kv_size].view(T, cfg.num_heads + cfg.num_kv_heads, cfg.head_dim),
                             batch.positions, cos_sin, native)
            q = qkv[:, : cfg.q_size].view(T, cfg.num_heads, cfg.head_dim)
            kv = qkv[:, cfg.q_size:].view(T, 2 * cfg.num_kv_heads, cfg.head_dim)
            attn = paged_attention(q, kv, kv_caches[i], batch.attn, self.scale, native_attention)
            x = lw.post_norm.add_(h, self._proj(attn, lw.o, i, "o", layout), native)
            gu = self._proj(x, lw.gate_up, i, "gate_up", layout)
            down = self._proj(swiglu(gu, native), lw.down, i, "down", layout)
            if i + 1 < len(self.layers):
                x = self.layers[i + 1].input_norm.add_(h, down, native)
            else:
                h.add_(down)
        last = h.index_select(0, batch.logits_rows)
        last = self.norm(last, native)
        return self.lm_head(last)
