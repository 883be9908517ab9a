"""Batched multi-adapter LoRA ops: torch reference vs a naive per-token oracle, Triton vs reference.

The Triton kernels run on CPU tensors through Triton's interpreter: lora_triton launches the
interpreted form for CPU tensors whatever TRITON_INTERPRET says, so nothing here sets it (it used
to, at import, and that leaked into test_cuda.py's compiled checks in the same process). Buffers
are filled with random values *including* the rank padding (rows >= r of A, columns >= r of B), so
any op that reads the padding gives a wrong answer.
"""
import os
import random
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from loragate.kernels import (
    BACKEND_ENV,
    LoraBatchLayout,
    Segment,
    add_lora,
    add_lora_ref,
    lora_expand,
    lora_expand_ref,
    lora_shrink,
    lora_shrink_ref,
    select_backend,
    triton_available,
)

try:
    import triton  # noqa: F401

    from loragate.kernels import lora_triton
except ImportError:  # pragma: no cover - exercised only where triton is missing
    lora_triton = None

needs_triton = pytest.mark.skipif(lora_triton is None, reason="triton not importable")

MAX_LORAS, MAX_RANK = 4, 16
SLOT_RANKS = [1, 3, 8, 16]
SLOT_SCALES = [0.5, 2.0, 1.0, 0.25]


@dataclass
class Group:
    """One fused projection group: input width and per-slice output widths."""

    in_dim: int
    slice_out: tuple[int, ...]

    @property
    def offsets(self) -> tuple[int, ...]:
        offs = [0]
        for n in self.slice_out:
            offs.append(offs[-1] + n)
        return tuple(offs)


GROUPS = {
    "o": Group(72, (40,)),  # S=1, widths not multiples of 16
    "qkv": Group(40, (40, 24, 24)),  # S=3, k/v narrower than q
}

# Decode segments (length 1), a long prefill segment, base-only tokens in between, and slot 2
# appearing in two separate segments; every rank 1/3/8/16 is present.
MIXED_SLOTS = [0, -1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, -1, -1, 3, 2, 2, -1, 0]


def make_weights(group: Group, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    S, N = len(group.slice_out), group.offsets[-1]
    A = torch.randn(MAX_LORAS, S, MAX_RANK, group.in_dim, generator=g) / group.in_dim**0.5
    B = torch.randn(MAX_LORAS, N, MAX_RANK, generator=g) / MAX_RANK**0.5
    return A.to(dtype), B.to(dtype)


def make_acts(T: int, group: Group, dtype: torch.dtype, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, group.in_dim, generator=g)
    y = torch.randn(T, group.offsets[-1], generator=g)
    return x.to(dtype), y.to(dtype)


def layout_for(token_slots: list[int]) -> LoraBatchLayout:
    return LoraBatchLayout.from_token_slots(token_slots, SLOT_RANKS, SLOT_SCALES)


def base_rows(layout: LoraBatchLayout) -> torch.Tensor:
    mask = torch.ones(layout.num_tokens, dtype=torch.bool)
    for seg in layout.segments:
        mask[seg.start : seg.start + seg.length] = False
    return mask


# --- naive oracles: one token, one slice at a time, in float64 ---------------------------------


def oracle_shrink(x, A, layout) -> torch.Tensor:
    T, S, R = x.shape[0], A.shape[1], A.shape[2]
    t = torch.zeros(T, S, R, dtype=torch.float64)
    for seg in layout.segments:
        for i in range(seg.start, seg.start + seg.length):
            for s in range(S):
                t[i, s, : seg.rank] = A[seg.slot, s, : seg.rank].double() @ x[i].double()
    return t


def oracle_add(y, x, A, B, offsets, layout) -> torch.Tensor:
    out = y.double().clone()
    for seg in layout.segments:
        r = seg.rank
        for i in range(seg.start, seg.start + seg.length):
            for s in range(len(offsets) - 1):
                a = A[seg.slot, s, :r].double()  # [r, in]
                b = B[seg.slot, offsets[s] : offsets[s + 1], :r].double()  # [out_s, r]
                out[i, offsets[s] : offsets[s + 1]] += seg.scale * (b @ (a @ x[i].double()))
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype == torch.float32:
        torch.testing.assert_close(actual.double(), expected.double(), atol=1e-4, rtol=1e-4)
    else:
        torch.testing.assert_close(actual.double(), expected.double(), atol=6e-2, rtol=3e-2)


# --- torch reference vs oracle ------------------------------------------------------------------


@pytest.mark.parametrize("group_name", list(GROUPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ref_matches_oracle(group_name, dtype):
    group = GROUPS[group_name]
    layout = layout_for(MIXED_SLOTS)
    A, B = make_weights(group, dtype)
    x, y0 = make_acts(len(MIXED_SLOTS), group, dtype)
    expected = oracle_add(y0, x, A, B, group.offsets, layout)
    base = base_rows(layout)

    t = lora_shrink_ref(x, A, layout)
    assert t.dtype == torch.float32
    assert_close(t, oracle_shrink(x, A, layout), dtype)

    y_split = y0.clone()
    lora_expand_ref(y_split, t, B, group.offsets, layout)
    y_fused = y0.clone()
    add_lora_ref(y_fused, x, A, B, group.offsets, layout)
    for y in (y_split, y_fused):
        assert_close(y, expected, dtype)
        assert torch.equal(y[base], y0[base])
    assert not torch.equal(y_fused[~base], y0[~base])  # the delta did land


@pytest.mark.parametrize("seed", range(20))
def test_ref_random_layouts(seed):
    rng = random.Random(seed)
    slots = [rng.randrange(-1, MAX_LORAS) for _ in range(rng.randint(1, 24))]
    group = GROUPS[rng.choice(sorted(GROUPS))]
    layout = layout_for(slots)
    A, B = make_weights(group, torch.float32, seed)
    x, y0 = make_acts(len(slots), group, torch.float32, seed + 1)
    y = y0.clone()
    add_lora_ref(y, x, A, B, group.offsets, layout)
    torch.testing.assert_close(y.double(), oracle_add(y0, x, A, B, group.offsets, layout), atol=1e-4, rtol=1e-4)
    assert torch.equal(y[base_rows(layout)], y0[base_rows(layout)])


def test_ref_on_noncontiguous_views():
    group = GROUPS["qkv"]
    layout = layout_for(MIXED_SLOTS)
    T = len(MIXED_SLOTS)
    A, B = make_weights(group, torch.float32)
    wide_x = torch.randn(T, group.in_dim + 7)
    wide_y = torch.randn(T, group.offsets[-1] + 5)
    x, y = wide_x[:, 3 : 3 + group.in_dim], wide_y[:, 2 : 2 + group.offsets[-1]]
    expected = oracle_add(y, x, A, B, group.offsets, layout)
    before = wide_y.clone()
    add_lora_ref(y, x, A, B, group.offsets, layout)
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(wide_y[:, :2], before[:, :2]) and torch.equal(wide_y[:, -3:], before[:, -3:])


def test_expand_ignores_t_outside_segments_and_ranks():
    """Expand must read only segment rows and the first r columns of t: NaN elsewhere is harmless."""
    group = GROUPS["qkv"]
    layout = layout_for(MIXED_SLOTS)
    A, B = make_weights(group, torch.float32)
    x, y0 = make_acts(len(MIXED_SLOTS), group, torch.float32)
    t = lora_shrink_ref(x, A, layout)
    assert torch.all(t[base_rows(layout)] == 0)
    dirty = torch.full_like(t, float("nan"))
    for seg in layout.segments:
        dirty[seg.start : seg.start + seg.length, :, : seg.rank] = t[seg.start : seg.start + seg.length, :, : seg.rank]
        assert torch.all(t[seg.start : seg.start + seg.length, :, seg.rank :] == 0)
    y_clean, y_dirty = y0.clone(), y0.clone()
    lora_expand_ref(y_clean, t, B, group.offsets, layout)
    lora_expand_ref(y_dirty, dirty, B, group.offsets, layout)
    assert torch.equal(y_clean, y_dirty)
    if lora_triton is not None:
        y_tri = y0.clone()
        lora_triton.lora_expand_triton(y_tri, dirty, B, group.offsets, layout)
        torch.testing.assert_close(y_tri, y_clean, atol=1e-5, rtol=1e-5)


def test_empty_layout_is_a_no_op():
    group = GROUPS["qkv"]
    layout = layout_for([-1] * 5)
    assert layout.empty
    A, B = make_weights(group, torch.float32)
    x, y0 = make_acts(5, group, torch.float32)
    y = y0.clone()
    add_lora_ref(y, x, A, B, group.offsets, layout)
    add_lora(y, x, A, B, group.offsets, layout)
    assert torch.equal(y, y0)
    t = lora_shrink_ref(x, A, layout)
    assert t.shape == (5, 3, MAX_RANK) and torch.all(t == 0)
    lora_expand_ref(y, t, B, group.offsets, layout)
    assert torch.equal(y, y0)


def test_shape_checks():
    group = GROUPS["o"]
    A, B = make_weights(group, torch.float32)
    x, y = make_acts(3, group, torch.float32)
    too_big = LoraBatchLayout.from_segments(3, [Segment(0, 3, 0, MAX_RANK + 1, 1.0)])
    with pytest.raises(ValueError, match="rank"):
        add_lora_ref(y, x, A, B, group.offsets, too_big)
    ok = layout_for([0, 0, 1])
    with pytest.raises(ValueError):
        add_lora_ref(y, x, A, B, (0, 20, 40), ok)  # 2 slices but A has 1
    with pytest.raises(ValueError):
        add_lora_ref(y[:2], x[:2], A, B, group.offsets, ok)  # token count mismatch


# --- Triton vs torch reference (interpreter on CPU) ---------------------------------------------


@needs_triton
@pytest.mark.parametrize("group_name", list(GROUPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_ref(group_name, dtype):
    group = GROUPS[group_name]
    layout = layout_for(MIXED_SLOTS)
    A, B = make_weights(group, dtype)
    x, y0 = make_acts(len(MIXED_SLOTS), group, dtype)
    base = base_rows(layout)

    t_tri = lora_triton.lora_shrink_triton(x, A, layout)
    t_ref = lora_shrink_ref(x, A, layout)
    torch.testing.assert_close(t_tri, t_ref, atol=1e-4, rtol=1e-4)  # both accumulate in fp32
    assert torch.all(t_tri[base] == 0)

    y_tri, y_ref = y0.clone(), y0.clone()
    lora_triton.lora_expand_triton(y_tri, t_ref, B, group.offsets, layout)
    lora_expand_ref(y_ref, t_ref, B, group.offsets, layout)
    assert_close(y_tri, y_ref, dtype)
    assert torch.equal(y_tri[base], y0[base])

    y_tri = y0.clone()
    lora_triton.add_lora_triton(y_tri, x, A, B, group.offsets, layout)
    assert_close(y_tri, oracle_add(y0, x, A, B, group.offsets, layout), dtype)
    assert torch.equal(y_tri[base], y0[base])


@needs_triton
def test_triton_noncontiguous_views_and_single_token_segments():
    group = GROUPS["qkv"]
    slots = [3, 0, -1, 1, 2, 3]  # all decode-length segments
    layout = layout_for(slots)
    T = len(slots)
    A_store, B = make_weights(group, torch.float32)
    A = A_store.transpose(0, 1).contiguous().transpose(0, 1)  # same values, permuted strides
    wide_x = torch.randn(T, group.in_dim + 7)
    wide_y = torch.randn(T, group.offsets[-1] + 5)
    x, y = wide_x[:, 3 : 3 + group.in_dim], wide_y[:, 2 : 2 + group.offsets[-1]]
    expected = oracle_add(y, x, A_store, B, group.offsets, layout)
    before = wide_y.clone()
    lora_triton.add_lora_triton(y, x, A, B, group.offsets, layout)
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(wide_y[:, :2], before[:, :2]) and torch.equal(wide_y[:, -3:], before[:, -3:])
    assert torch.equal(wide_y[2], before[2])


def triton_add_matches_oracle(group: Group, slots: list[int], A: torch.Tensor, B: torch.Tensor):
    """add_lora_triton on fp32 activations equals the oracle; returns (y, y before)."""
    layout = layout_for(slots)
    x, y0 = make_acts(len(slots), group, torch.float32)
    y = y0.clone()
    lora_triton.add_lora_triton(y, x, A, B, group.offsets, layout)
    torch.testing.assert_close(y.double(), oracle_add(y0, x, A, B, group.offsets, layout), atol=1e-4, rtol=1e-4)
    return y, y0


@needs_triton
def test_triton_long_prefill_spans_row_blocks():
    """A segment longer than BLOCK_M, starting mid-batch, and a slot reused in two segments."""
    group = GROUPS["o"]
    y, y0 = triton_add_matches_oracle(group, [-1] * 3 + [2] * 37 + [1] + [2] * 5, *make_weights(group, torch.float32))
    assert torch.equal(y[:3], y0[:3])


@needs_triton
def test_triton_empty_layout():
    group = GROUPS["qkv"]
    layout = layout_for([-1, -1])
    A, B = make_weights(group, torch.float32)
    x, y0 = make_acts(2, group, torch.float32)
    y = y0.clone()
    lora_triton.add_lora_triton(y, x, A, B, group.offsets, layout)
    t = lora_triton.lora_shrink_triton(x, A, layout)
    lora_triton.lora_expand_triton(y, t, B, group.offsets, layout)
    assert torch.equal(y, y0) and torch.all(t == 0)


# --- dispatcher ---------------------------------------------------------------------------------


def test_dispatch_defaults_to_torch_on_cpu(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert select_backend(torch.zeros(1)) == "torch"
    monkeypatch.setenv(BACKEND_ENV, "cuda-magic")
    with pytest.raises(ValueError):
        select_backend(torch.zeros(1))


@needs_triton
@pytest.mark.parametrize("forced", ["torch", "triton"])
def test_dispatch_forced_backend(monkeypatch, forced):
    group = GROUPS["qkv"]
    layout = layout_for(MIXED_SLOTS)
    A, B = make_weights(group, torch.float32)
    x, y0 = make_acts(len(MIXED_SLOTS), group, torch.float32)
    monkeypatch.setenv(BACKEND_ENV, forced)
    assert triton_available() and select_backend(x) == forced

    calls: list[str] = []
    for name in ("lora_shrink_triton", "lora_expand_triton", "add_lora_triton"):
        real = getattr(lora_triton, name)

        def spy(*args, _real=real, _name=name):
            calls.append(_name)
            return _real(*args)

        monkeypatch.setattr(lora_triton, name, spy)

    expected = oracle_add(y0, x, A, B, group.offsets, layout)
    y = y0.clone()
    add_lora(y, x, A, B, group.offsets, layout)
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-4)
    y = y0.clone()
    lora_expand(y, lora_shrink(x, A, layout), B, group.offsets, layout)
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-4)
    if forced == "triton":
        assert calls[0] == "add_lora_triton"  # (which itself launches the expand)
        assert calls[-2:] == ["lora_shrink_triton", "lora_expand_triton"]
    else:
        assert calls == []


@needs_triton
@pytest.mark.parametrize("interpret", ["1", "0", None])
def test_compiled_or_interpreted_follows_the_device_not_TRITON_INTERPRET(interpret):
    """Whatever TRITON_INTERPRET says when lora_triton is first imported (a fresh process each),
    CUDA tensors get the compiled kernels and CPU tensors the interpreter."""
    code = (
        "import torch\n"
        "from triton.runtime.jit import JITFunction\n"
        "from triton.runtime.interpreter import InterpretedFunction\n"
        "from loragate.kernels import lora_triton as lt\n"
        "for k in (lt.SHRINK, lt.EXPAND):\n"
        "    assert type(k.on(torch.device('cuda'))) is JITFunction, type(k.on(torch.device('cuda')))\n"
        "    assert isinstance(k.on(torch.device('cpu')), InterpretedFunction)\n"
        "assert lt._dot_mode(torch.bfloat16, torch.device('cuda'))['DOT_FP32'] is False\n"
        "assert lt._dot_mode(torch.bfloat16, torch.device('cpu'))['DOT_FP32'] is True\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret is not None:
        env["TRITON_INTERPRET"] = interpret
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


@needs_triton
def test_compiled_launches_turn_the_interpret_knob_off_while_they_compile(monkeypatch):
    """With TRITON_INTERPRET=1 set, triton's constexpr functions would answer as for the interpreter
    while a CUDA kernel compiles; the launch switches the knob off around it and restores it."""
    knobs = getattr(triton, "knobs", None)
    if knobs is None:
        pytest.skip("this triton has no knobs (and its constexpr functions do not consult one)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert knobs.runtime.interpret
    with lora_triton._compiling_as_compiled():
        assert not knobs.runtime.interpret
    assert knobs.runtime.interpret and os.environ["TRITON_INTERPRET"] == "1"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with lora_triton._compiling_as_compiled():
        assert not knobs.runtime.interpret


def test_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, loragate.kernels as k\n"
        "assert not k.triton_available()\n"
        "assert k.select_backend(torch.zeros(1)) == 'torch'\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop(BACKEND_ENV, None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_ref_many_decode_segments_take_the_gathered_path():
    """32 single-token segments of mixed ranks: the BGMV-style batched path is used, and agrees
    with the oracle (rank padding of the buffers holds random values, so reading it would fail)."""
    rng = random.Random(7)
    slots = [rng.randrange(0, MAX_LORAS) for _ in range(32)]
    slots = [s for i, s in enumerate(slots) if i == 0 or s != slots[i - 1]]
    for name, group in GROUPS.items():
        layout = layout_for(slots)
        A, B = make_weights(group, torch.float32, 3)
        x, y0 = make_acts(len(slots), group, torch.float32, 4)
        y = y0.clone()
        add_lora_ref(y, x, A, B, group.offsets, layout)
        assert layout.memo.get("gather") is not None, name
        torch.testing.assert_close(y.double(), oracle_add(y0, x, A, B, group.offsets, layout), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("token_slots", [
    MIXED_SLOTS,  # per-segment path for the long segment, gathered path (rows not contiguous)
    [0, 1, 2, 3, 0, 2, 1],  # decode-only: the gathered single-token path on a contiguous span
    [0, 0, 1, 1, 1, 2, -1, 3, 3],  # short multi-token segments: gathered with padding
])
def test_ref_skips_slices_no_adapter_targets(token_slots):
    """`slices` names the only slices to compute: the result equals the oracle on weights whose
    other slices are zero, even though the buffers hold random values there."""
    group = GROUPS["qkv"]
    layout = layout_for(token_slots)
    A, B = make_weights(group, torch.float32, 5)
    x, y0 = make_acts(len(token_slots), group, torch.float32, 6)
    A0, B0 = A.clone(), B.clone()
    A0[:, 1] = 0  # slice 1 (k) untargeted
    B0[:, group.offsets[1]:group.offsets[2]] = 0
    y = y0.clone()
    add_lora_ref(y, x, A, B, group.offsets, layout, slices=(0, 2))
    torch.testing.assert_close(y.double(), oracle_add(y0, x, A0, B0, group.offsets, layout), atol=1e-4, rtol=1e-4)
    assert torch.equal(y[:, group.offsets[1]:group.offsets[2]], y0[:, group.offsets[1]:group.offsets[2]])


def test_rewriting_a_slot_leaves_no_trace_of_its_previous_adapter():
    """Slots are zeroed only where the previous adapter wrote; the next adapter must see zeros
    everywhere it does not write itself (other groups, other slices, ranks above its own)."""
    from loragate.engine.model.lora import LoraWeights, group_specs

    specs = group_specs(hidden=16, q_out=16, kv_out=8, intermediate=24)
    w = LoraWeights(specs, num_layers=2, max_loras=2, max_rank=8, device=torch.device("cpu"), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    first = {(l, m): (torch.randn(8, specs[grp].in_dim, generator=g), torch.randn(out, 8, generator=g))
             for l in range(2) for m, grp, out in (("q_proj", "qkv", 16), ("k_proj", "qkv", 8),
                                                   ("gate_proj", "gate_up", 24), ("down_proj", "down", 16))}
    w.write_slot(1, first, rank=8, scale=1.0)
    second = {(0, "v_proj"): (torch.ones(2, 16), torch.ones(8, 2))}
    w.write_slot(1, second, rank=2, scale=1.0)
    for layer in range(2):
        for grp in specs:
            A, B = w.A[layer][grp][1].clone(), w.B[layer][grp][1].clone()
            if layer == 0 and grp == "qkv":
                assert torch.equal(A[2, :2], torch.ones(2, 16))
                A[2, :2] = 0
                B[24:32, :2] = 0
            assert not A.any() and not B.any(), (layer, grp)
    assert w.slot_slices[1] == frozenset({("qkv", 2)}) and w.slot_ranks[1] == 2


# --- native CPU kernel vs oracle ----------------------------------------------------------------

from loragate.kernels import lora as lora_dispatch  # noqa: E402
from loragate.kernels import lora_cpu, native  # noqa: E402

from native_marks import needs_compiler  # noqa: E402

ALL_SLICES = {name: tuple(range(len(g.slice_out))) for name, g in GROUPS.items()}


def rank_major(B: torch.Tensor) -> torch.Tensor:
    """B with the same values in the engine's CPU layout (a view of a contiguous [slots, R, N])."""
    return B.transpose(1, 2).contiguous().transpose(1, 2)


def native_weights(group: Group, dtype: torch.dtype, seed: int = 0):
    A, B = make_weights(group, dtype, seed)
    return A, rank_major(B)


@needs_compiler
def test_native_lora_builds():
    assert native.load(lora_cpu.LIBRARY).library is not None, native.load(lora_cpu.LIBRARY).error


@needs_compiler
@pytest.mark.parametrize("group_name", list(GROUPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_matches_oracle(group_name, dtype, isa_target):
    """Every segment of the mixed layout (decodes, the long prefill, a slot in two segments, every
    rank), rank padding of the buffers random, base rows untouched; on every build path."""
    group = GROUPS[group_name]
    layout = layout_for(MIXED_SLOTS)
    A, B = native_weights(group, dtype)
    x, y0 = make_acts(len(MIXED_SLOTS), group, dtype)
    y = y0.clone()
    lora_cpu.add_lora_native(y, x, A, B, group.offsets, layout, ALL_SLICES[group_name], max_len=1000)
    assert_close(y, oracle_add(y0, x, A, B, group.offsets, layout), dtype)
    base = base_rows(layout)
    assert torch.equal(y[base], y0[base]) and not torch.equal(y[~base], y0[~base])


@needs_compiler
@pytest.mark.parametrize("seed", range(10))
def test_native_random_layouts_on_strided_views(seed, isa_target):
    rng = random.Random(100 + seed)
    slots = [rng.randrange(-1, MAX_LORAS) for _ in range(rng.randint(1, 40))]
    group = GROUPS[rng.choice(sorted(GROUPS))]
    layout = layout_for(slots)
    A, B = native_weights(group, torch.float32, seed)
    T = len(slots)
    wide_x, wide_y = torch.randn(T, group.in_dim + 5), torch.randn(T, group.offsets[-1] + 3)
    x, y = wide_x[:, 2:2 + group.in_dim], wide_y[:, 1:1 + group.offsets[-1]]
    expected = oracle_add(y, x, A, B, group.offsets, layout)
    before = wide_y.clone()
    lora_cpu.add_lora_native(y, x, A, B, group.offsets, layout, tuple(range(len(group.slice_out))), max_len=1000)
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(wide_y[:, :1], before[:, :1]) and torch.equal(wide_y[:, -2:], before[:, -2:])


@needs_compiler
def test_native_computes_only_the_active_slices():
    group = GROUPS["qkv"]
    layout = layout_for([0, 1, 2, 3, 0, 2, 1])
    A, B = native_weights(group, torch.float32, 5)
    x, y0 = make_acts(7, group, torch.float32, 6)
    A0, B0 = A.clone(), B.clone()
    A0[:, 1] = 0
    B0[:, group.offsets[1]:group.offsets[2]] = 0
    y = y0.clone()
    lora_cpu.add_lora_native(y, x, A, B, group.offsets, layout, (0, 2), max_len=1000)
    torch.testing.assert_close(y.double(), oracle_add(y0, x, A0, B0, group.offsets, layout), atol=1e-4, rtol=1e-4)
    assert torch.equal(y[:, group.offsets[1]:group.offsets[2]], y0[:, group.offsets[1]:group.offsets[2]])


@needs_compiler
def test_dispatch_splits_short_and_long_segments(monkeypatch):
    """add_lora on the CPU: the native kernel for segments of little work (tokens x input width x
    rank), the matmul form for bigger ones (spied on), together equal to the oracle;
    LORAGATE_CPU_KERNELS=torch runs the torch reference instead."""
    layout = layout_for(MIXED_SLOTS)
    group = GROUPS["qkv"]
    in_dim = make_acts(1, group, torch.float32)[0].shape[1]
    # room for 4 tokens at the step's largest rank: MIXED_SLOTS' 18-token segment is long
    monkeypatch.setattr(lora_dispatch, "NATIVE_MAX_WORK", 4 * in_dim * layout.max_rank)
    assert lora_dispatch.native_max_len(in_dim, layout.max_rank) == 4
    monkeypatch.delenv(native.BACKEND_ENV, raising=False)
    A, B = native_weights(group, torch.float32)
    x, y0 = make_acts(len(MIXED_SLOTS), group, torch.float32)
    calls: list[str] = []
    for module, name in ((lora_dispatch, "add_lora_segment"), (lora_dispatch, "add_lora_ref"),
                         (lora_cpu, "add_lora_native")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    expected = oracle_add(y0, x, A, B, group.offsets, layout)
    y = y0.clone()
    add_lora(y, x, A, B, group.offsets, layout)
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-4)
    assert calls == ["add_lora_native", "add_lora_segment"]
    calls.clear()
    monkeypatch.setenv(native.BACKEND_ENV, "torch")
    y = y0.clone()
    add_lora(y, x, A, B, group.offsets, layout)
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-4)
    assert calls == ["add_lora_ref"]
    calls.clear()
    monkeypatch.delenv(native.BACKEND_ENV)
    add_lora(y0.clone(), x, A, B.contiguous(), group.offsets, layout)  # B not rank-major: the torch path
    assert calls == ["add_lora_ref"]


@needs_compiler
def test_native_refuses_out_of_range_segments_and_writes_nothing():
    group = GROUPS["o"]
    A, B = native_weights(group, torch.float32)
    x, y0 = make_acts(4, group, torch.float32)
    for seg in (Segment(0, 2, MAX_LORAS, 1, 1.0),  # a slot past the buffers
                Segment(0, 2, 0, MAX_RANK + 1, 1.0),  # a rank past the buffers
                Segment(3, 2, 0, 1, 1.0)):  # rows past the batch
        layout = LoraBatchLayout.from_segments(4, [Segment(2, 1, 1, 3, 1.0), seg])
        y = y0.clone()
        with pytest.raises(RuntimeError, match="out of range"):
            lora_cpu.add_lora_native(y, x, A, B, group.offsets, layout, (0,), max_len=1000)
        assert torch.equal(y, y0)
    with pytest.raises(ValueError):
        lora_cpu.add_lora_native(y0, x, A, B, (0, 40, 40), layout_for([0, 0, 1, 1]), (0,), max_len=8)


@needs_triton
def test_triton_reads_the_cpu_rank_major_B_too():
    """The engine keeps B rank-major on the CPU; the Triton kernels take strides, so forcing them
    on CPU tensors (as the interpreter tests do) still reads B right."""
    group = GROUPS["qkv"]
    A, B = native_weights(group, torch.float32)
    assert not B.is_contiguous()
    triton_add_matches_oracle(group, MIXED_SLOTS, A, B)
