"""Dispatcher of the batched LoRA ops: Triton for CUDA tensors; on the CPU, `add_lora` runs the
native kernel (lora_cpu.py) where it built, and the torch reference otherwise.

`LORAGATE_LORA_BACKEND=triton|torch` forces Triton or not (tests use it to run the Triton kernels
on CPU tensors, which lora_triton launches through Triton's interpreter); `LORAGATE_CPU_KERNELS=torch` turns the native CPU
kernel off (see loragate.kernels.native). The variables are read on every call so a test can
switch them; triton is imported lazily, so the package works where triton is not installed.
`disable_triton` is the engine's switch (its start-up self-check found the Triton kernels unusable,
or the server runs with `--lora-kernels torch`): CUDA tensors then take the torch reference too.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from types import ModuleType

import torch

from loragate.kernels import lora_cpu
from loragate.kernels.layout import LoraBatchLayout
from loragate.kernels.lora_ref import add_lora_ref, add_lora_segment, check_shapes, lora_expand_ref, lora_shrink_ref

BACKEND_ENV = "LORAGATE_LORA_BACKEND"
BACKENDS = ("torch", "triton")
# Which segments the native CPU kernel takes: those whose work, tokens x input width x rank, is at
# most this; the others (a prefill of one adapter, a big model's long segment, a high rank) go
# through two matmuls that reuse A and B across the rows. The kernel does a token's few dot
# products with no reuse across tokens, at a fraction of the matmuls' rate, but without their
# per-call cost (~3 calls a segment, tens of microseconds each), so which is faster depends on the
# segment's work, not on its length alone. Measured per segment on a 2-core AVX-512 host in bf16
# (q|k|v group; `python -m bench.lora_segments`, bench/RESULTS.md), the native kernel stopped
# winning at a work of 0.7-1.3 million (in_dim 576 rank 8: ~150 tokens; 2048 rank 8: ~80; 4096
# rank 8: ~40; 576 rank 64: ~25; 2048 rank 64: ~10; 4096 rank 64: under 8), which this bound keeps
# just below. Decode tokens (length 1) always qualify. The former fixed bound of 64 tokens sent
# rank-64 segments of a 4096-wide model to the kernel at 2-4x the matmuls' time.
NATIVE_MAX_WORK = 700_000


def native_max_len(in_dim: int, max_rank: int) -> int:
    """The longest segment the native kernel takes in a step whose largest rank is `max_rank`."""
    return max(1, NATIVE_MAX_WORK // max(in_dim * max_rank, 1))


_triton_disabled: str | None = None  # why the Triton kernels are switched off, or None


def disable_triton(reason: str) -> None:
    """Route every op through the torch path for the rest of the process (or until enabled)."""
    global _triton_disabled
    _triton_disabled = reason


def enable_triton() -> None:
    global _triton_disabled
    _triton_disabled = None


@lru_cache(maxsize=1)
def _triton_module() -> ModuleType | None:
    """`lora_triton`, or None when triton cannot be imported here."""
    try:
        from loragate.kernels import lora_triton
    except Exception:  # ImportError, or a triton install without a usable backend
        return None
    return lora_triton


def triton_available() -> bool:
    return _triton_disabled is None and _triton_module() is not None


def select_backend(tensor: torch.Tensor) -> str:
    """The backend for ops on `tensor`: the forced one if set, else triton on CUDA when available."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {forced!r}")
        if forced == "triton" and not triton_available():
            why = f"the Triton kernels are disabled ({_triton_disabled})" if _triton_disabled else "triton cannot be imported"
            raise RuntimeError(f"{BACKEND_ENV}=triton but {why}")
        return forced
    return "triton" if tensor.is_cuda and triton_available() else "torch"


def lora_shrink(x: torch.Tensor, A: torch.Tensor, layout: LoraBatchLayout) -> torch.Tensor:
    """float32 `[T, S, R]`: t[seg, s, :r] = x[seg] @ A[slot, s, :r].T, zeros elsewhere."""
    if select_backend(x) == "triton":
        return _triton_module().lora_shrink_triton(x, A, layout)
    return lora_shrink_ref(x, A, layout)


def lora_expand(
    y: torch.Tensor,
    t: torch.Tensor,
    B: torch.Tensor,
    slice_offsets: Sequence[int],
    layout: LoraBatchLayout,
) -> None:
    """In place: y[seg, off_s:off_s1] += scale * t[seg, s, :r] @ B[slot, off_s:off_s1, :r].T."""
    if select_backend(y) == "triton":
        _triton_module().lora_expand_triton(y, t, B, slice_offsets, layout)
    else:
        lora_expand_ref(y, t, B, slice_offsets, layout)


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    slice_offsets: Sequence[int],
    layout: LoraBatchLayout,
    slices: Sequence[int] | None = None,
) -> None:
    """y += LoRA delta of every segment (what each LoRA-targeted projection group calls).

    `slices`, when given, lists the only slices of the group that any adapter of the step targets
    (q and v of q|k|v for PEFT's default targets). The torch path skips the others; the Triton
    kernels compute them, which is harmless since untargeted slices of a slot are zero."""
    if layout.empty:
        return
    backend = select_backend(y)
    if backend == "triton":
        _triton_module().add_lora_triton(y, x, A, B, slice_offsets, layout)
    elif not lora_cpu.use_native(y, A, B):
        add_lora_ref(y, x, A, B, slice_offsets, layout, slices)
    else:  # CPU: one native call for the short segments, matmuls for the long ones
        check_shapes(x, y, A, B, slice_offsets, layout)
        active = tuple(range(A.shape[1])) if slices is None else tuple(slices)
        max_len = native_max_len(x.shape[1], layout.max_rank)
        lora_cpu.add_lora_native(y, x, A, B, slice_offsets, layout, active, max_len)
        for seg in layout.segments:
            if seg.length > max_len:
                add_lora_segment(y, x, A, B, slice_offsets, seg, active)
