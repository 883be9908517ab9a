"""Fused decode attention over a paged KV cache on the CPU (csrc/decode_attention.cpp).

One query token per sequence attends to the context its slot index names, read in place from the
cache, after this step's keys and values are written to their slots in the same call. The torch
path (`loragate.engine.model.attention.decode_attention_torch`, also the CUDA path and this
kernel's test oracle) gathers that context into a padded copy and runs two batched matmuls and a
softmax, calls whose fixed costs dominate at decode shapes on the CPU. The backend is chosen by
`loragate.kernels.native.use_native` (`LORAGATE_CPU_KERNELS`).
"""
from __future__ import annotations

import ctypes

import torch

from loragate.kernels import native

LIBRARY = "decode_attention"
_ARGTYPES = [
    ctypes.c_int,  # dtype
    ctypes.c_void_p, ctypes.c_int64,  # q, q_stride
    ctypes.c_void_p, ctypes.c_int64,  # cache, num_slots
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,  # new_kv, stride, slot_mapping, num_new
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,  # kv_index, index_stride, lens
    ctypes.c_void_p,  # out
    ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # batch, Hq, Hk, D
    ctypes.c_float, ctypes.c_int,  # scale, threads
]


def native_available() -> bool:
    """Whether the kernel built and loaded on this host (builds it on the first call)."""
    return native.load(LIBRARY).library is not None


def use_native(q: torch.Tensor) -> bool:
    return native.use_native(q, LIBRARY)


def decode_attention_native(
    q: torch.Tensor,  # [B, Hq, D], heads contiguous (rows may be strided: a view of the qkv buffer)
    kv_cache: torch.Tensor,  # [2*Hk, slots, D] contiguous: keys, then values
    kv_index: torch.Tensor,  # [B, L] contiguous int64 cache slots of each sequence's context
    lens: torch.Tensor,  # [B] int64 context lengths (<= L; the kernel checks)
    scale: float,
    new_kv: torch.Tensor | None = None,  # [T, 2*Hk, D] this step's keys|values, heads contiguous
    slot_mapping: torch.Tensor | None = None,  # [T] int64 their cache slots
) -> torch.Tensor:
    """Write `new_kv` at `slot_mapping` (if given), then softmax(q k^T * scale) v per sequence and
    query head (GQA: head h reads KV head h // g), float32 math; [B, Hq, D] in q's dtype.

    Called once per layer and step: the checks are the few attribute reads that keep the C side
    inside its buffers (slot indices and lengths are range-checked there)."""
    B, Hq, D = q.shape
    Hk2, num_slots, Dc = kv_cache.shape
    code = native.DTYPE_CODES.get(q.dtype)
    if code is None or q.device.type != "cpu" or kv_cache.dtype != q.dtype:
        raise ValueError("native decode attention takes CPU tensors of one dtype: float32, bfloat16 or float16")
    if q.stride(2) != 1 or q.stride(1) != D or Dc != D or not kv_cache.is_contiguous() or Hq % (Hk2 // 2):
        raise ValueError("q must be [B, Hq, D] with contiguous heads, kv_cache a contiguous [2*Hk, slots, D], "
                         "Hq a multiple of Hk")
    if (kv_index.dtype != torch.int64 or lens.dtype != torch.int64 or kv_index.shape[0] != B
            or not kv_index.is_contiguous() or lens.shape != (B,) or lens.stride(0) != 1):
        raise ValueError("kv_index [B, L] and lens [B] must be contiguous int64")
    num_new, new_ptr, new_stride, slots_ptr = 0, None, 0, None
    if new_kv is not None:
        if (new_kv.dtype != q.dtype or new_kv.shape[1] != Hk2 or new_kv.shape[2] != D or new_kv.stride(2) != 1
                or new_kv.stride(1) != D or slot_mapping is None or slot_mapping.dtype != torch.int64
                or slot_mapping.shape != (new_kv.shape[0],) or slot_mapping.stride(0) != 1):
            raise ValueError("new_kv must be [T, 2*Hk, D] with contiguous heads, slot_mapping a contiguous int64 [T]")
        num_new, new_ptr, new_stride = new_kv.shape[0], new_kv.data_ptr(), new_kv.stride(0)
        slots_ptr = slot_mapping.data_ptr()
    out = torch.empty(B, Hq, D, dtype=q.dtype)
    fn = native.function(LIBRARY, "loragate_decode_attention", _ARGTYPES)
    rc = fn(code, q.data_ptr(), q.stride(0), kv_cache.data_ptr(), num_slots, new_ptr, new_stride, slots_ptr, num_new,
            kv_index.data_ptr(), kv_index.stride(0), lens.data_ptr(), out.data_ptr(), B, Hq, Hk2 // 2, D, scale,
            torch.get_num_threads())
    native.check(rc, "decode attention")
    return out
