"""Batched multi-adapter LoRA on the CPU in one native call per projection group
(csrc/lora.cpp): every short segment's tokens read their adapter's A and B rows in place.

B is read rank-major (`rank_major`): a rank row of an adapter's B is then one vector over the
outputs, and the expand is `rank` vector multiply-adds. Computes what `lora_ref.add_lora_ref`
computes (the rank-r intermediate rounded to the activations' dtype, the delta summed in float32 and
added with one rounding) for segments of at most `max_len` tokens; longer ones (a prefill of one
adapter) are left to the caller's matmuls, which reuse A and B across rows. The backend is chosen by
`loragate.kernels.native.use_native` (`LORAGATE_CPU_KERNELS`).
"""
from __future__ import annotations

import ctypes
from collections.abc import Sequence
from functools import lru_cache

import torch

from loragate.kernels import native
from loragate.kernels.layout import LoraBatchLayout

LIBRARY = "lora"
MAX_RANK = 256  # the kernel's per-token buffer
_I, _P, _N = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_ARGTYPES = [_N, _P, _I, _P, _I, _P, _P, _I, _I, _I, _I, _I, _P, _P, _I, _P, _P, _P, _P, _P, _I, _I, _I, _N]


def rank_major(B: torch.Tensor) -> bool:
    """Whether B [slots, N, R] is a view of a contiguous [slots, R, N] buffer, the layout the
    kernel reads (each rank row of an adapter's B is then a vector over the outputs; the engine
    allocates its CPU LoRA buffers this way)."""
    slots, N, R = B.shape
    return B.stride() == (R * N, 1, N)


def use_native(y: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> bool:
    return A.shape[2] <= MAX_RANK and rank_major(B) and native.use_native(y, LIBRARY)


@lru_cache(maxsize=256)
def _int64s(values: tuple[int, ...]) -> torch.Tensor:
    """A host int64 tensor of a small constant tuple (slice offsets, active slices), made once."""
    return torch.tensor(values, dtype=torch.int64)


def add_lora_native(
    y: torch.Tensor,  # [T, N], updated in place (rows may be strided)
    x: torch.Tensor,  # [T, in]
    A: torch.Tensor,  # [slots, S, R, in] contiguous
    B: torch.Tensor,  # [slots, N, R], a view of a contiguous [slots, R, N] (see rank_major)
    slice_offsets: Sequence[int],
    layout: LoraBatchLayout,
    active: Sequence[int],
    max_len: int,
) -> None:
    """y += the LoRA delta of every segment of at most `max_len` tokens, for the `active` slices."""
    code = native.DTYPE_CODES.get(y.dtype)
    T, N = y.shape
    slots, S, R, in_dim = A.shape
    if (code is None or x.dtype != y.dtype or A.dtype != y.dtype or B.dtype != y.dtype or y.device.type != "cpu"
            or x.shape != (T, in_dim) or B.shape != (slots, N, R) or y.stride(1) != 1 or x.stride(1) != 1
            or not A.is_contiguous() or not rank_major(B) or len(slice_offsets) != S + 1 or R > MAX_RANK
            or layout.num_tokens != T or layout.seg_starts.dtype != torch.int32):
        raise ValueError("add_lora_native: CPU tensors of one dtype, y [T, N], x [T, in], contiguous "
                         "A [slots, S, R, in], B [slots, N, R] rank-major, S + 1 slice offsets")
    offsets, act = _int64s(tuple(slice_offsets)), _int64s(tuple(active))
    fn = native.function(LIBRARY, "loragate_add_lora", _ARGTYPES)
    rc = fn(code, y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0), A.data_ptr(), B.data_ptr(), slots, S, R,
            in_dim, N, offsets.data_ptr(), act.data_ptr(), act.numel(), layout.seg_starts.data_ptr(),
            layout.seg_lens.data_ptr(), layout.seg_slots.data_ptr(), layout.seg_ranks.data_ptr(),
            layout.seg_scales.data_ptr(), len(layout.segments), max_len, T, torch.get_num_threads())
    native.check(rc, "add_lora")
