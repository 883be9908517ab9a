"""The decoder layer's row-wise ops as single native passes on the CPU (csrc/elementwise.cpp):
residual add + RMSNorm, SiLU(gate) * up, rotary embedding in place; and the greedy sampler's
argmax over the logits. Each rounds where
transformers' Llama code rounds; the torch forms in loragate.engine.model are their references and
the CUDA path. The backend is chosen by `loragate.kernels.native.use_native` (`LORAGATE_CPU_KERNELS`).

The wrappers are called ~120 times a decode step, so they do only what keeps the C side safe
(shapes, strides, dtypes: a few attribute reads) and nothing else: at decode sizes Python's own
cost per call is comparable to the kernel's.
"""
from __future__ import annotations

import ctypes

import torch

from loragate.kernels import native

LIBRARY = "elementwise"
_I, _P, _F, _N = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "loragate_add_rms_norm": [_N, _P, _I, _P, _I, _P, _P, _I, _I, _I, _F, _N],
    "loragate_silu_mul": [_N, _P, _I, _P, _I, _I, _I, _N],
    "loragate_rope": [_N, _P, _I, _I, _I, _I, _P, _P, _P, _I, _N],
    "loragate_argmax_rows": [_N, _P, _I, _I, _I, _P, _N],
}


def _fn(symbol: str) -> ctypes._CFuncPtr:
    return native.function(LIBRARY, symbol, _SIGNATURES[symbol])


def use_native(x: torch.Tensor) -> bool:
    return native.use_native(x, LIBRARY)


def _code(x: torch.Tensor, what: str) -> int:
    code = native.DTYPE_CODES.get(x.dtype)
    if code is None or x.device.type != "cpu":
        raise ValueError(f"{what}: CPU float32/bfloat16/float16 tensors only")
    return code


def add_rms_norm_native(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """h [rows, dim] (rows may be strided). With `delta` (same shape), h += delta in place first
    (h must then be contiguous). Returns weight * h / sqrt(mean(h^2) + eps), a new tensor."""
    code = _code(h, "rms_norm")
    rows, dim = h.shape
    if h.stride(1) != 1 or weight.dtype != h.dtype or weight.shape != (dim,) or weight.stride(0) != 1:
        raise ValueError("rms_norm: h must have contiguous rows and weight be a contiguous [dim] of h's dtype")
    d_ptr, d_stride = None, 0
    if delta is not None:
        if not h.is_contiguous() or delta.shape != h.shape or delta.stride(1) != 1 or delta.dtype != h.dtype:
            raise ValueError("rms_norm: h (updated in place) must be contiguous and delta match it")
        d_ptr, d_stride = delta.data_ptr(), delta.stride(0)
    out = torch.empty(rows, dim, dtype=h.dtype)
    rc = _fn("loragate_add_rms_norm")(code, h.data_ptr(), h.stride(0), d_ptr, d_stride, weight.data_ptr(),
                                      out.data_ptr(), dim, rows, dim, eps, torch.get_num_threads())
    native.check(rc, "rms_norm")
    return out


def silu_mul_native(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [rows, 2*I] (gate first; rows may be strided): [rows, I]."""
    code = _code(gate_up, "silu_mul")
    rows, width = gate_up.shape
    if gate_up.stride(1) != 1 or width % 2:
        raise ValueError("silu_mul: gate_up must be [rows, 2*I] with contiguous rows")
    dim = width // 2
    out = torch.empty(rows, dim, dtype=gate_up.dtype)
    rc = _fn("loragate_silu_mul")(code, gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), dim, rows, dim,
                                  torch.get_num_threads())
    native.check(rc, "silu_mul")
    return out


def rope_native_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x [T, H, D] in place (token rows may be strided, heads contiguous): x*cos +
    rotate_half(x)*sin with cos, sin contiguous [max_positions, D/2] tables in x's dtype."""
    code = _code(x, "rope")
    T, H, D = x.shape
    if x.stride(2) != 1 or x.stride(1) != D:
        raise ValueError("rope: x must be [T, H, D] with contiguous heads")
    if (cos.dtype != x.dtype or sin.dtype != x.dtype or cos.shape != sin.shape or cos.shape[1] * 2 != D
            or not cos.is_contiguous() or not sin.is_contiguous()):
        raise ValueError("rope: cos and sin must be contiguous [max_positions, D/2] tables of x's dtype")
    if positions.dtype != torch.int64 or positions.shape != (T,) or positions.stride(0) != 1:
        raise ValueError("rope: positions must be a contiguous int64 [T]")
    rc = _fn("loragate_rope")(code, x.data_ptr(), x.stride(0), T, H, D, positions.data_ptr(), cos.data_ptr(),
                              sin.data_ptr(), cos.shape[0], torch.get_num_threads())
    native.check(rc, "rope")


def argmax_rows_native(x: torch.Tensor) -> torch.Tensor:
    """int64 [rows]: each row's first maximum of x [rows, cols] (rows may be strided), as
    torch.argmax answers (a row's first NaN, if any) but in one pass over the row."""
    code = _code(x, "argmax")
    rows, cols = x.shape
    if x.stride(1) != 1 or cols == 0:
        raise ValueError("argmax: x must be a non-empty [rows, cols] with contiguous rows")
    out = torch.empty(rows, dtype=torch.int64)
    rc = _fn("loragate_argmax_rows")(code, x.data_ptr(), x.stride(0), rows, cols, out.data_ptr(),
                                     torch.get_num_threads())
    native.check(rc, "argmax")
    return out
