"""Rotary position embeddings with the scaling variants Llama checkpoints use (linear, llama3).

The cos/sin table is computed once for every position up to the model's context and indexed by
each token's absolute position, so a flat batch with sequences at different offsets needs no
per-sequence work.
"""
from __future__ import annotations

import math

import torch

from loragate.kernels.elementwise import rope_native_


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv
    rtype = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling.get("factor", 1.0))
    if rtype == "linear":
        return inv / factor
    if rtype == "llama3":
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        low_wavelen = old_ctx / low
        high_wavelen = old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling {rtype!r}")


class RotaryEmbedding:
    """Precomputed cos/sin for positions [0, max_positions).

    HF rotates with `x * cos + rotate_half(x) * sin`, rotate_half(x) = cat(-x2, x1). We keep sin
    with its first half negated, so rotate_half(x) * sin = roll(x, half) * signed_sin: the rotation
    of queries and keys together is three ops per layer (roll, mul, addcmul) instead of twelve.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None,
                 device: torch.device, dtype: torch.dtype) -> None:
        inv = inv_frequencies(head_dim, theta, scaling).to(torch.float32)
        pos = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(pos, inv)
        # [max_positions, D/2] tables in the model dtype (as transformers casts cos and sin): the
        # native CPU kernel reads both halves' factors from one row; the torch form uses them
        # widened to D (casting and negating commute, so these equal HF's full-width tables)
        self.cos_half = freqs.cos().to(device=device, dtype=dtype).contiguous()
        self.sin_half = freqs.sin().to(device=device, dtype=dtype).contiguous()
        self.cos = torch.cat([self.cos_half, self.cos_half], dim=-1)
        self.signed_sin = torch.cat([-self.sin_half, self.sin_half], dim=-1)
        self.half = head_dim // 2

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin [T, 1, D] for the tokens' positions: once per step, shared by all layers."""
        return self.cos.index_select(0, positions).unsqueeze(1), self.signed_sin.index_select(0, positions).unsqueeze(1)

    def apply_(self, x: torch.Tensor, positions: torch.Tensor,
               cos_sin: tuple[torch.Tensor, torch.Tensor] | None, native: bool = False) -> torch.Tensor:
        """Rotate x: [T, H, D] (queries and keys side by side, any token stride) in place, HF's
        rotate_half form. In place so the rotated keys stay where the projection put them.
        `native`: the one-pass CPU kernel, which reads the tables by position (no `cos_sin`)."""
        if native:
            rope_native_(x, positions, self.cos_half, self.sin_half)
            return x
        cos, signed_sin = cos_sin
        return torch.addcmul(x * cos, x.roll(self.half, dims=-1), signed_sin, out=x)
