"""RMSNorm (with the residual add before it as one step), on the CPU by the native kernel when it
built (loragate.kernels.elementwise: add and norm in one pass), else through torch's fused
LayerNorm kernel as below; CUDA has a fused rms_norm kernel and uses it.

The torch form: torch's `rms_norm` is a composite on the CPU: about ten small kernels per call
(upcast, square, mean, add, rsqrt, multiply, downcast, weight), and a decode step of a 30-layer
model makes 61 calls, where per-call overhead is what a CPU decode step is made of. The row [x, -x]
has mean exactly 0 and variance mean(x^2), so LayerNorm over it is x / sqrt(mean(x^2) + eps) in its
first half: one copy plus one fused, vectorised kernel that also applies the weight (the second
half is multiplied by zeros and never read). The result equals torch's rms_norm bit for bit in bf16
and to fp32 rounding in fp32 (tested).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from loragate.kernels.elementwise import add_rms_norm_native


class RMSNorm:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, statistics in fp32 whatever the input
    dtype (as transformers' LlamaRMSNorm computes them)."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        self.weight = weight
        self.eps = eps
        self.dim = weight.shape[0]
        self._padded = torch.cat([weight, torch.zeros_like(weight)]) if weight.device.type == "cpu" else None

    def __call__(self, x: torch.Tensor, native: bool = False) -> torch.Tensor:
        """`native`: the one-pass CPU kernel (loragate.kernels.elementwise), which the caller
        chose once for the step; it rounds as transformers does."""
        if native:
            return add_rms_norm_native(x, None, self.weight, self.eps)
        if self._padded is None:
            return F.rms_norm(x, (self.dim,), self.weight, self.eps)
        return F.layer_norm(torch.cat([x, -x], dim=-1), (2 * self.dim,), self._padded, None, self.eps)[..., : self.dim]

    def add_(self, h: torch.Tensor, delta: torch.Tensor, native: bool = False) -> torch.Tensor:
        """The residual step: h += delta in place, then the norm of the new h (one pass when native)."""
        if native:
            return add_rms_norm_native(h, delta, self.weight, self.eps)
        h.add_(delta)
        return self(h)
