"""Fused attention of short prompt chunks over a paged KV cache on the CPU, bf16
(csrc/chunk_attention.cpp).

Each chunk's query tokens attend to its context (cached blocks, then the chunk's own tokens, with
the bottom-right causal mask) read in place from the cache through its slot index, in one
flash-attention-style pass: no gathered copy of the contexts, no padded score tensor, no separate
mask or softmax pass. The torch path (`loragate.engine.model.chunk_attention.attend_group`) is the
fallback and this kernel's test oracle.

The library always builds where a compiler is found, but it is fast only with AVX-512 BF16 (pair
dot products in hardware); on other hosts it runs an emulation of the same arithmetic, which the
tests use and the engine does not (`fast_path`). `LORAGATE_CPU_KERNELS=native` forces it anyway,
`=torch` never uses it.
"""
from __future__ import annotations

import ctypes
import os

import torch

from loragate.kernels import native

LIBRARY = "chunk_attention"
FAST_PATH = "avx512-bf16"
_ARGTYPES = [
    ctypes.c_int,  # dtype
    ctypes.c_void_p, ctypes.c_int64,  # q, q_stride
    ctypes.c_void_p, ctypes.c_int64,  # cache, num_slots
    ctypes.c_void_p, ctypes.c_int64,  # kv_index, its length
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,  # q_start, lens, ctxs, kv_offsets
    ctypes.c_int64, ctypes.c_int64,  # num_chunks, num_tokens
    ctypes.c_void_p, ctypes.c_int64,  # out, out_stride
    ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # Hq, Hk, D
    ctypes.c_float, ctypes.c_int,  # scale, threads
]
_paths: dict[str, str] = {}  # built library file -> its arithmetic path (asked once)
_ERRORS = {-1: "only bfloat16 is supported", -2: "an index or length is out of range",
           -3: "head_dim must be a multiple of 16 up to 256 and Hq a multiple of Hk"}


def path() -> str | None:
    """The library's arithmetic path ("avx512-bf16", "avx512", "portable"), None when it did not
    build or this CPU cannot run it (native.py refuses a library built for instructions it lacks)."""
    build = native.load(LIBRARY)
    if build.library is None:
        return None
    key = str(build.path)
    if key not in _paths:
        name = build.library.loragate_chunk_attention_path
        name.restype, name.argtypes = ctypes.c_char_p, []
        _paths[key] = name().decode()
    return _paths[key]


def use_native(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the engine attends short chunks with this kernel: bf16 CPU tensors, and the fast path
    (or `LORAGATE_CPU_KERNELS=native`, which takes any path and fails loudly without the library)."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return False
    forced = os.environ.get(native.BACKEND_ENV, "").strip().lower()
    if forced == "torch":
        return False
    found = path()
    if forced == "native":
        if found is None:
            raise RuntimeError(f"{native.BACKEND_ENV}=native but the native kernel {LIBRARY} is unavailable: "
                               f"{native.load(LIBRARY).error or 'this CPU cannot run it'}")
        return True
    return found == FAST_PATH


def chunk_attention_native(
    q: torch.Tensor,  # [T, Hq, D] bf16, heads contiguous (rows may be strided)
    kv_cache: torch.Tensor,  # [2*Hk, slots, D] contiguous: keys, then values (this step's written)
    kv_index: torch.Tensor,  # [sum ctx] int64 cache slots of every chunk's context, concatenated
    q_start: torch.Tensor,  # [C] int64 first query row of each chunk
    lens: torch.Tensor,  # [C] int64 query tokens of each chunk
    ctxs: torch.Tensor,  # [C] int64 context length of each chunk (>= its tokens; its own come last)
    kv_offsets: torch.Tensor,  # [C] int64 where each chunk's context starts in kv_index
    scale: float,
    out: torch.Tensor,  # [T, Hq, D] bf16, heads contiguous: the chunks' rows are written
) -> None:
    """softmax(q k^T * scale + causal mask) v for every chunk, written to its rows of `out`; the
    chunk's query token t sees context positions up to ctx - n + t. Called once per layer and step:
    the checks are what keeps the C side inside its buffers (indices are range-checked there)."""
    T, Hq, D = q.shape
    Hk2, num_slots, Dc = kv_cache.shape
    if q.dtype != torch.bfloat16 or kv_cache.dtype != q.dtype or out.dtype != q.dtype or q.device.type != "cpu":
        raise ValueError("native chunk attention takes bfloat16 CPU tensors")
    if (q.stride(2) != 1 or q.stride(1) != D or Dc != D or not kv_cache.is_contiguous() or out.shape != q.shape
            or out.stride(2) != 1 or out.stride(1) != D):
        raise ValueError("q and out must be [T, Hq, D] with contiguous heads, kv_cache a contiguous [2*Hk, slots, D]")
    C = q_start.shape[0]
    for t in (kv_index, q_start, lens, ctxs, kv_offsets):
        if t.dtype != torch.int64 or t.dim() != 1 or t.stride(0) != 1 or t.device.type != "cpu":
            raise ValueError("kv_index, q_start, lens, ctxs and kv_offsets must be contiguous 1-D int64 CPU tensors")
    if not lens.shape[0] == ctxs.shape[0] == kv_offsets.shape[0] == C:
        raise ValueError("q_start, lens, ctxs and kv_offsets must have one entry per chunk")
    fn = native.function(LIBRARY, "loragate_chunk_attention", _ARGTYPES)
    rc = fn(native.DTYPE_CODES[q.dtype], q.data_ptr(), q.stride(0), kv_cache.data_ptr(), num_slots,
            kv_index.data_ptr(), kv_index.numel(), q_start.data_ptr(), lens.data_ptr(), ctxs.data_ptr(),
            kv_offsets.data_ptr(), C, T, out.data_ptr(), out.stride(0), Hq, Hk2 // 2, D, scale,
            torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"native chunk attention failed (code {rc}: {_ERRORS.get(rc, 'unknown error')})")
