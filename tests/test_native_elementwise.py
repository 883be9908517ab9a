"""The native row-wise CPU kernels (residual add + RMSNorm, SiLU * up, RoPE) against transformers'
Llama formulas written in torch, in each storage dtype, at decode and at prefill sizes (the
latter run on several threads)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loragate.engine.model.rope import RotaryEmbedding
from loragate.kernels import native
from loragate.kernels.elementwise import add_rms_norm_native, argmax_rows_native, rope_native_, silu_mul_native

from native_marks import needs_compiler

pytestmark = needs_compiler

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROWS = [1, 7, 300]  # 300 rows x 576 is past the kernels' threshold for going parallel
# one unit in the last place of the storage type, relative: the native kernels round once where
# torch sums in another order or computes silu/exp a few float32 ulps apart
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=8e-3),
       torch.float16: dict(atol=1e-3, rtol=1e-3)}


def test_native_elementwise_builds():
    assert native.load("elementwise").library is not None, native.load("elementwise").error


def hf_rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(h.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
def test_add_rms_norm(dtype, rows, isa_target):
    g = torch.Generator().manual_seed(rows)
    h = torch.randn(rows, 576, generator=g).to(dtype)
    delta = torch.randn(rows, 576, generator=g).to(dtype)
    weight = (1 + 0.1 * torch.randn(576, generator=g)).to(dtype)
    expected_h = h + delta
    out = add_rms_norm_native(h, delta, weight, 1e-5)
    assert torch.equal(h, expected_h)  # the residual add is exact: one rounding, as torch's
    torch.testing.assert_close(out, hf_rms_norm(expected_h, weight, 1e-5), **TOL[dtype])
    # norm only, of a strided input
    wide = torch.randn(rows, 2 * 576, generator=g).to(dtype)
    torch.testing.assert_close(add_rms_norm_native(wide[:, :576], None, weight, 1e-6),
                               hf_rms_norm(wide[:, :576], weight, 1e-6), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
def test_silu_mul(dtype, rows, isa_target):
    g = torch.Generator().manual_seed(rows + 1)
    gate_up = (4 * torch.randn(rows, 2 * 1536, generator=g)).to(dtype)  # large |x| too: both branches of sigmoid
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(silu_mul_native(gate_up), F.silu(gate) * up, **TOL[dtype])


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("head_dim", [64, 16])
def test_rope_in_place(dtype, rows, head_dim, isa_target):
    """q|k heads of a q|k|v buffer rotated in place; v untouched. As transformers computes it:
    cos/sin cast to the storage dtype, x*cos + rotate_half(x)*sin with each product rounded."""
    Hq, Hk = 9, 3
    g = torch.Generator().manual_seed(rows + head_dim)
    rope = RotaryEmbedding(head_dim, 4096, 10000.0, {"rope_type": "llama3", "factor": 8.0}, torch.device("cpu"), dtype)
    qkv = torch.randn(rows, (Hq + 2 * Hk) * head_dim, generator=g).to(dtype)
    positions = torch.randint(0, 4096, (rows,), generator=g)
    x = qkv[:, : (Hq + Hk) * head_dim].view(rows, Hq + Hk, head_dim)
    v_before = qkv[:, (Hq + Hk) * head_dim:].clone()
    before = x.clone()
    cos = torch.cat([rope.cos_half, rope.cos_half], dim=-1)[positions].unsqueeze(1)
    sin = torch.cat([rope.sin_half, rope.sin_half], dim=-1)[positions].unsqueeze(1)
    expected = before * cos + rotate_half(before) * sin
    rope_native_(x, positions, rope.cos_half, rope.sin_half)
    torch.testing.assert_close(x, expected, **TOL[dtype])
    assert torch.equal(qkv[:, (Hq + Hk) * head_dim:], v_before)
    # the torch path of the engine agrees
    torch_path = before.clone()
    rope.apply_(torch_path, positions, rope.lookup(positions))
    torch.testing.assert_close(x, torch_path, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_rows(dtype, isa_target):
    """The first maximum of each row, as torch.argmax: ties, the first and last column, a NaN, a
    row of -inf, widths with a tail past the 64-column chunks (the sampler's tests cover more)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4096 + 7, generator=g).to(dtype)
    high = x.amax() + 1
    x[0, [70, 4100]] = high
    x[1, -1] = high
    x[2, 0] = high
    x[3, 2000] = float("nan")
    x[4] = float("-inf")
    assert argmax_rows_native(x).tolist() == x.argmax(-1).tolist()
    assert argmax_rows_native(x[:, :1000]).tolist() == x[:, :1000].argmax(-1).tolist()  # strided rows


def test_bad_inputs_are_refused():
    rope = RotaryEmbedding(16, 32, 10000.0, None, torch.device("cpu"), torch.float32)
    x = torch.randn(3, 2, 16)
    before = x.clone()
    with pytest.raises(RuntimeError, match="out of range"):
        rope_native_(x, torch.tensor([0, 32, 1]), rope.cos_half, rope.sin_half)  # a position past the table
    assert torch.equal(x[1], before[1])  # that token untouched
    with pytest.raises(ValueError):
        rope_native_(x, torch.tensor([0, 1, 2], dtype=torch.int32), rope.cos_half, rope.sin_half)
    with pytest.raises(ValueError):
        add_rms_norm_native(torch.randn(4, 8), None, torch.ones(8, dtype=torch.bfloat16), 1e-6)
    h = torch.randn(8, 4).t()  # not contiguous: cannot be updated in place
    with pytest.raises(ValueError):
        add_rms_norm_native(h, torch.randn(4, 8), torch.ones(8), 1e-6)
