"""The base model's projections, with the weight laid out once for the device's fastest GEMM.

On the CPU, `F.linear` hands oneDNN a plain row-major weight and oneDNN reorders it into its
blocked layout on every call. For decode-sized inputs (a few to a few dozen rows) that reorder
costs about as much as the product itself: measured on a 2-core AVX-512 host, a bf16
[8, 576] x [576, 3072] product takes ~200 us plain and ~110 us with the weight reordered once at
load time (the same trick PyTorch's inductor applies when it freezes a CPU model). Results are
bit-identical in bf16. CUDA and CPUs without oneDNN keep the plain weight and `F.linear`.

Set LORAGATE_CPU_PREPACK=0 to turn the reorder off (for comparison runs).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F


def prepack_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether weights of this device and dtype are reordered for oneDNN at load time."""
    if device.type != "cpu" or os.environ.get("LORAGATE_CPU_PREPACK", "1") == "0":
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


class Linear:
    """y = x @ W^T (+ b) for x of any leading shape; W is [out, in] as in the checkpoint."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, prepack: bool | None = None) -> None:
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        if prepack is None:
            prepack = prepack_supported(weight.device, weight.dtype)
        # the plain weight is dropped when packed: keeping both would double the model's memory
        self.weight: torch.Tensor | None = None if prepack else weight
        self._packed = torch.ops.mkldnn._reorder_linear_weight(weight) if prepack else None

    @property
    def packed(self) -> bool:
        return self._packed is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
