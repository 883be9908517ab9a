"""Triton kernels of the batched multi-adapter LoRA ops (segmented gather matmuls, after Punica's SGMV).

One launch covers every adapter in the batch: program (segment, row block, slice[, column block])
reads its segment's start/length/slot/rank/scale from the layout's device tensors, so the host
never inspects the batch and no launch depends on which adapters are present. Row blocks past a
segment's end and rank columns past its `r` are masked, so padding is neither read nor computed.

Shapes and conventions are those of `lora_ref.py`: `t` is float32 `[T, S, R]`; the shrink writes
only segment rows (all R columns, zeros past `r`); the expand reads only segment rows and the first
`r` columns of `t`, and each y element is owned by exactly one program (load-add-store, no atomics).
This module imports triton at import time; `lora.py` imports it lazily.

Compiled or interpreted is chosen per call by the tensors' device, never by `TRITON_INTERPRET`:
each kernel is kept in both of Triton's forms (`_Kernel`), CUDA tensors launch the compiled one and
CPU tensors (the interpreter tests, the self-check on a host without a GPU) the interpreted one.
`triton.jit` would pick one form for the whole process when this module is first imported, so one
test that sets `TRITON_INTERPRET=1` for its CPU checks used to make every later CUDA launch in the
same process run interpreted (the first GPU run's test failures).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import contextmanager
from functools import lru_cache

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from loragate.kernels.layout import LoraBatchLayout
from loragate.kernels.lora_ref import check_shapes


def _shrink_kernel(
    x_ptr, a_ptr, t_ptr,
    seg_starts_ptr, seg_lens_ptr, seg_slots_ptr, seg_ranks_ptr,
    in_dim, max_rank,
    stride_xm, stride_xk,
    stride_al, stride_as, stride_ar, stride_ak,
    stride_tm, stride_ts, stride_tr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    seg = tl.program_id(0)
    mblk = tl.program_id(1)
    sl = tl.program_id(2)
    length = tl.load(seg_lens_ptr + seg)
    if mblk * BLOCK_M >= length:
        return
    start = tl.load(seg_starts_ptr + seg)
    slot = tl.load(seg_slots_ptr + seg).to(tl.int64)
    rank = tl.load(seg_ranks_ptr + seg)

    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < length
    rows = (start + offs_m).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank

    x_rows = x_ptr + rows[:, None] * stride_xm
    a_base = a_ptr + slot * stride_al + sl * stride_as + offs_r[None, :] * stride_ar
    # tl.full, not tl.zeros: zeros is a jit function of triton's standard library, which the
    # interpreter can only call when triton itself was imported under TRITON_INTERPRET=1
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, dtype=tl.float32)
    for k0 in range(0, in_dim, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < in_dim
        xt = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_base + offs_k[:, None] * stride_ak, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        at = at.to(xt.dtype)
        if DOT_FP32:
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        acc += tl.dot(xt, at, input_precision=PRECISION)

    t_ptrs = t_ptr + rows[:, None] * stride_tm + sl * stride_ts + offs_r[None, :] * stride_tr
    tl.store(t_ptrs, acc, mask=row_mask[:, None] & (offs_r < max_rank)[None, :])


def _expand_kernel(
    y_ptr, t_ptr, b_ptr, slice_offs_ptr,
    seg_starts_ptr, seg_lens_ptr, seg_slots_ptr, seg_ranks_ptr, seg_scales_ptr,
    n_col_blocks,
    stride_ym, stride_yn,
    stride_tm, stride_ts, stride_tr,
    stride_bl, stride_bn, stride_br,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    seg = tl.program_id(0)
    mblk = tl.program_id(1)
    pid2 = tl.program_id(2)
    sl = pid2 // n_col_blocks
    nblk = pid2 % n_col_blocks
    length = tl.load(seg_lens_ptr + seg)
    col0 = tl.load(slice_offs_ptr + sl)
    col1 = tl.load(slice_offs_ptr + sl + 1)
    if mblk * BLOCK_M >= length or col0 + nblk * BLOCK_N >= col1:
        return
    start = tl.load(seg_starts_ptr + seg)
    slot = tl.load(seg_slots_ptr + seg).to(tl.int64)
    rank = tl.load(seg_ranks_ptr + seg)
    scale = tl.load(seg_scales_ptr + seg)

    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < length
    rows = (start + offs_m).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    offs_n = col0 + nblk * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < col1

    tt = tl.load(
        t_ptr + rows[:, None] * stride_tm + sl * stride_ts + offs_r[None, :] * stride_tr,
        mask=row_mask[:, None] & r_mask[None, :], other=0.0,
    )
    bt = tl.load(
        b_ptr + slot * stride_bl + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
        mask=r_mask[:, None] & n_mask[None, :], other=0.0,
    )
    # 16-bit weights: round the intermediate to their dtype so the dot runs on tensor cores.
    tt = tt.to(bt.dtype)
    if DOT_FP32:
        tt = tt.to(tl.float32)
        bt = bt.to(tl.float32)
    delta = tl.dot(tt, bt, input_precision=PRECISION) * scale
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask = row_mask[:, None] & n_mask[None, :]
    yt = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (yt + delta).to(y_ptr.dtype.element_ty), mask=mask)


class _Kernel:
    """One kernel in both of Triton's forms: compiled for CUDA tensors, interpreted (made on first
    use) for CPU tensors, whatever `TRITON_INTERPRET` said when this module was imported."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.compiled = JITFunction(fn)
        self._interpreted = None

    @property
    def interpreted(self):
        if self._interpreted is None:
            from triton.runtime.interpreter import InterpretedFunction

            self._interpreted = InterpretedFunction(self.fn)
        return self._interpreted

    def on(self, device: torch.device):
        """The form that runs on `device`'s tensors."""
        return self.compiled if device.type == "cuda" else self.interpreted

    def launch(self, device: torch.device, grid: tuple, *args, **kwargs) -> None:
        if device.type != "cuda":
            self.interpreted[grid](*args, **kwargs)
        elif os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):  # the usual case: one dict lookup
            self.compiled[grid](*args, **kwargs)
        else:
            with _compiling_as_compiled():
                self.compiled[grid](*args, **kwargs)


@contextmanager
def _compiling_as_compiled():
    """Triton's interpret knob off for a compiled launch: its constexpr functions consult the knob
    while compiling (triton.runtime.jit.constexpr_function), so with TRITON_INTERPRET=1 set they
    would hand the code generator plain values. Triton versions without knobs need nothing."""
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is None or not getattr(runtime, "interpret", False):
        yield
        return
    with runtime.scope():
        runtime.interpret = False
        yield


SHRINK = _Kernel(_shrink_kernel)
EXPAND = _Kernel(_expand_kernel)


def interpreted(device: torch.device) -> bool:
    """Whether launches on `device`'s tensors run Triton's CPU interpreter."""
    return device.type != "cuda"


def _pow2_at_least(n: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(max(n, 1)))


def _block_m(layout: LoraBatchLayout) -> int:
    """Small row blocks for decode-heavy steps (length-1 segments), larger for prefill."""
    return 16 if layout.max_seg_len <= 16 else 32 if layout.max_seg_len <= 256 else 64


def _dot_mode(dtype: torch.dtype, device: torch.device) -> dict:
    """Kernel constexprs for the dot of `dtype` operands. fp32 inputs use exact fp32 products
    (tf32 would break parity with the reference). Triton's CPU interpreter computes bf16 `tl.dot`
    wrongly (numpy has no bf16), so there the operands are widened to fp32 after rounding."""
    widen = dtype == torch.bfloat16 and interpreted(device)
    ieee = dtype == torch.float32 or widen
    return {"PRECISION": "ieee" if ieee else "tf32", "DOT_FP32": widen}


@lru_cache(maxsize=64)
def _slice_offsets_tensor(slice_offsets: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Device copy of a group's slice offsets, made once per (group shape, device)."""
    return torch.tensor(slice_offsets, dtype=torch.int32, device=device)


def _shrink_into(x: torch.Tensor, A: torch.Tensor, layout: LoraBatchLayout, t: torch.Tensor) -> None:
    if layout.max_seg_len == 0:  # also covers an empty layout: nothing to launch
        return
    S, R, in_dim = A.shape[1], A.shape[2], A.shape[3]
    block_m = _block_m(layout)
    grid = (len(layout.segments), triton.cdiv(layout.max_seg_len, block_m), S)
    # The interpreter gets the loop bound `in_dim` as a constexpr: a runtime int reaches the kernel
    # as a one-element array there, and triton<=3.6's interpreter turns it into range()'s bound
    # with int(array), which numpy>=2.4 refuses ("only 0-dimensional arrays can be converted").
    # The compiled form keeps it a runtime argument (one binary for every input width).
    in_dim_arg = tl.constexpr(in_dim) if interpreted(x.device) else in_dim
    SHRINK.launch(
        x.device, grid,
        x, A, t,
        layout.seg_starts, layout.seg_lens, layout.seg_slots, layout.seg_ranks,
        in_dim_arg, R,
        x.stride(0), x.stride(1),
        A.stride(0), A.stride(1), A.stride(2), A.stride(3),
        t.stride(0), t.stride(1), t.stride(2),
        BLOCK_M=block_m, BLOCK_K=64 if in_dim >= 64 else 16 if in_dim <= 16 else 32,
        BLOCK_R=_pow2_at_least(layout.max_rank, 16),
        **_dot_mode(x.dtype, x.device),
    )


def lora_shrink_triton(x: torch.Tensor, A: torch.Tensor, layout: LoraBatchLayout) -> torch.Tensor:
    """t[seg, s, :r] = x[seg] @ A[slot, s, :r].T as float32 `[T, S, R]`, zeros elsewhere."""
    check_shapes(x, None, A, None, None, layout)
    t = torch.zeros(x.shape[0], A.shape[1], A.shape[2], dtype=torch.float32, device=x.device)
    _shrink_into(x, A, layout, t)
    return t


def lora_expand_triton(
    y: torch.Tensor,
    t: torch.Tensor,
    B: torch.Tensor,
    slice_offsets: Sequence[int],
    layout: LoraBatchLayout,
) -> None:
    """In place: y[seg, off_s:off_s1] += scale * t[seg, s, :r] @ B[slot, off_s:off_s1, :r].T."""
    check_shapes(None, y, None, B, slice_offsets, layout)
    if t.dim() != 3 or t.shape[0] != y.shape[0] or t.shape[1] != len(slice_offsets) - 1:
        raise ValueError(f"t must be [T, S, R], got {tuple(t.shape)}")
    if layout.max_seg_len == 0:
        return
    offs = tuple(int(o) for o in slice_offsets)
    S = len(offs) - 1
    max_width = max(b - a for a, b in zip(offs, offs[1:]))
    if max_width == 0:
        return
    block_m = _block_m(layout)
    block_n = 64 if max_width >= 64 else 32 if max_width > 16 else 16
    n_col_blocks = triton.cdiv(max_width, block_n)
    grid = (len(layout.segments), triton.cdiv(layout.max_seg_len, block_m), S * n_col_blocks)
    EXPAND.launch(
        y.device, grid,
        y, t, B, _slice_offsets_tensor(offs, y.device),
        layout.seg_starts, layout.seg_lens, layout.seg_slots, layout.seg_ranks, layout.seg_scales,
        n_col_blocks,
        y.stride(0), y.stride(1),
        t.stride(0), t.stride(1), t.stride(2),
        B.stride(0), B.stride(1), B.stride(2),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=_pow2_at_least(layout.max_rank, 16),
        **_dot_mode(B.dtype, y.device),
    )


def add_lora_triton(
    y: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    slice_offsets: Sequence[int],
    layout: LoraBatchLayout,
) -> None:
    """Shrink then expand. `t` is left unfilled outside segment rows: the expand never reads it."""
    if layout.empty:
        return
    check_shapes(x, y, A, B, slice_offsets, layout)
    t = torch.empty(x.shape[0], A.shape[1], A.shape[2], dtype=torch.float32, device=x.device)
    _shrink_into(x, A, layout, t)
    lora_expand_triton(y, t, B, slice_offsets, layout)
