"""Decode attention over the paged cache, both CPU backends (the torch path and the fused native
kernel), against a plain per-sequence float64 softmax attention."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from loragate.engine.model import attention
from loragate.engine.model.attention import AttentionMetadata, decode_attention, decode_attention_torch
from loragate.kernels import decode_attention as native_attention
from loragate.kernels import native
from loragate.kernels.decode_attention import decode_attention_native
from loragate.kernels.native import BACKEND_ENV

from native_marks import needs_compiler



def reference(q: torch.Tensor, kv_cache: torch.Tensor, kv_index: list[torch.Tensor], scale: float) -> torch.Tensor:
    """float64 attention of each sequence's query heads over its own context (GQA by head // g)."""
    Hk = kv_cache.shape[0] // 2
    B, Hq, D = q.shape
    out = torch.empty(B, Hq, D, dtype=torch.float64)
    for b, idx in enumerate(kv_index):
        k = kv_cache[:Hk, idx].double()  # [Hk, L, D]
        v = kv_cache[Hk:, idx].double()
        for h in range(Hq):
            kh = h // (Hq // Hk)
            p = torch.softmax(q[b, h].double() @ k[kh].T * scale, dim=-1)
            out[b, h] = p @ v[kh]
    return out


@dataclass
class Case:
    q: torch.Tensor  # [B, Hq, D], a strided view of a q|k|v buffer as in the model
    kv_cache: torch.Tensor
    kv_index: list[torch.Tensor]  # per sequence, its context's slots
    meta: AttentionMetadata

    @property
    def scale(self) -> float:
        return self.q.shape[-1] ** -0.5

    def expected(self) -> torch.Tensor:
        return reference(self.q, self.kv_cache, self.kv_index, self.scale)


def make_case(batch: int, Hq: int, Hk: int, D: int, dtype: torch.dtype, seed: int, max_len: int = 20) -> Case:
    """Sequences of different lengths with scrambled block tables, padded to whole blocks."""
    g = torch.Generator().manual_seed(seed)
    block, num_blocks = 4, 24 * batch
    kv_cache = torch.randn(2 * Hk, num_blocks * block, D, generator=g).to(dtype)
    blocks = torch.randperm(num_blocks, generator=g)
    lens = torch.randint(1, max_len, (batch,), generator=g).tolist()
    L = -(-max(lens) // block) * block
    kv_index, nxt = [], 0
    for n in lens:
        nb = -(-n // block)
        table = blocks[nxt:nxt + nb]
        nxt += nb
        pos = torch.arange(n)
        kv_index.append(table[pos // block] * block + pos % block)
    padded = torch.zeros(batch, L, dtype=torch.long)
    mask = torch.zeros(batch, 1, 1, L, dtype=torch.bool)
    for b, idx in enumerate(kv_index):
        padded[b, : len(idx)] = idx
        mask[b, ..., : len(idx)] = True
    meta = AttentionMetadata(slot_mapping=torch.zeros(batch, dtype=torch.long), decode_rows=torch.arange(batch),
                             decode_kv_index=padded, decode_mask=mask, decode_lens=torch.tensor(lens))
    qkv = torch.randn(batch, (Hq + 2 * Hk) * D, generator=g).to(dtype)
    return Case(qkv[:, : Hq * D].view(batch, Hq, D), kv_cache, kv_index, meta)


TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3, 40])
def test_torch_decode_attention_matches_reference(dtype, batch, monkeypatch):
    """Covers the float32-math path of small reduced-precision batches and the native-dtype path
    of large ones (the threshold is lowered so both run on small shapes), GQA, and sequences of
    different lengths padded to whole blocks with scrambled block tables."""
    monkeypatch.setattr(attention, "SMALL_DECODE_ROWS", 256)
    case = make_case(batch, Hq=6, Hk=2, D=16, dtype=dtype, seed=batch)
    out = decode_attention_torch(case.q, case.kv_cache, case.meta, case.scale)
    assert out.shape == case.q.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), case.expected(), **TOL[dtype])


@needs_compiler
def test_native_kernel_builds_where_a_compiler_is():
    assert native_attention.native_available(), native.load("decode_attention").error


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,head_dim", [((6, 2), 16), ((9, 3), 64), ((4, 4), 128), ((8, 1), 80)])
@pytest.mark.parametrize("batch", [1, 5, 33])
def test_native_decode_attention_matches_reference(dtype, heads, head_dim, batch, isa_target):
    """Head widths with a vector-register path (64, 128) and without (16, 80); GQA groups of 1 to 8;
    q as a strided view of the qkv buffer; contexts up to 60 rows over scrambled pages; on every
    build path (AVX-512, AVX2, portable) this host runs."""
    Hq, Hk = heads
    case = make_case(batch, Hq, Hk, head_dim, dtype, seed=batch * 7 + head_dim, max_len=60)
    out = decode_attention_native(case.q, case.kv_cache, case.meta.decode_kv_index, case.meta.decode_lens, case.scale)
    assert out.shape == case.q.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), case.expected(), **TOL[dtype])


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_writes_the_steps_kv_before_attending(dtype, isa_target):
    """The engine's decode call also stores this step's keys and values: each sequence's newest
    token is the last slot of its context, and the result must attend to the new rows."""
    case = make_case(5, Hq=6, Hk=2, D=64, dtype=dtype, seed=11)
    newest = torch.stack([idx[-1] for idx in case.kv_index])
    new_kv = torch.randn(5, 4, 64, generator=torch.Generator().manual_seed(2)).to(dtype)
    cache = case.kv_cache.clone()
    out = decode_attention_native(case.q, cache, case.meta.decode_kv_index, case.meta.decode_lens, case.scale,
                                  new_kv, newest)
    expected_cache = case.kv_cache.clone()
    expected_cache[:, newest] = new_kv.transpose(0, 1)
    assert torch.equal(cache, expected_cache)
    torch.testing.assert_close(out.double(), reference(case.q, expected_cache, case.kv_index, case.scale), **TOL[dtype])
    with pytest.raises(RuntimeError, match="out of range"):
        decode_attention_native(case.q, cache, case.meta.decode_kv_index, case.meta.decode_lens, case.scale, new_kv,
                                newest + cache.shape[1])


@needs_compiler
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_dispatch_follows_the_backend_variable(backend, monkeypatch):
    """The engine's entry point runs the forced backend (spied on), and both agree."""
    monkeypatch.setenv(BACKEND_ENV, backend)
    case = make_case(4, Hq=6, Hk=2, D=64, dtype=torch.float32, seed=3)
    calls = []
    for name in ("decode_attention_native", "decode_attention_torch"):
        real = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    out = decode_attention(case.q, case.kv_cache, case.meta, case.scale)
    assert calls == [f"decode_attention_{backend}"]
    torch.testing.assert_close(out.double(), case.expected(), atol=1e-5, rtol=1e-5)


@needs_compiler
def test_native_refuses_bad_indices_and_shapes():
    case = make_case(3, Hq=6, Hk=2, D=16, dtype=torch.float32, seed=5)
    index, lens = case.meta.decode_kv_index, case.meta.decode_lens
    run = lambda idx, n: decode_attention_native(case.q, case.kv_cache, idx, n, case.scale)  # noqa: E731
    bad = index.clone()
    bad[1, 0] = case.kv_cache.shape[1]  # one past the last slot
    with pytest.raises(RuntimeError, match="out of range"):
        run(bad, lens)
    with pytest.raises(RuntimeError, match="out of range"):
        run(index, lens + index.shape[1])  # longer than the index row
    with pytest.raises(ValueError):
        run(index[:, :4], lens)  # a strided view of the index
    with pytest.raises(ValueError):
        run(index.int(), lens)
    with pytest.raises(ValueError):
        decode_attention_native(case.q.contiguous().transpose(1, 2), case.kv_cache, index, lens, case.scale)
    # an empty context attends to nothing: zeros rather than the NaN of 0/0
    empty = lens.clone()
    empty[0] = 0
    out = run(index, empty)
    assert out[0].abs().max() == 0 and torch.isfinite(out).all()


def test_without_a_compiler_the_torch_path_serves(monkeypatch, tmp_path):
    """A host where the build fails: the kernel reports unavailable, and decode attention still
    answers (through the torch path); forcing native says why it cannot."""
    monkeypatch.setenv(native.CXX_ENV, "false")  # a "compiler" that fails every build
    monkeypatch.setenv("CXX", "false")
    monkeypatch.setenv("PATH", str(tmp_path))  # ... and no c++ / g++ to fall back on
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    native.forget("decode_attention")
    try:
        assert native.compiler() is None
        assert not native_attention.native_available()
        assert "no C++ compiler" in native.load("decode_attention").error
        case = make_case(3, Hq=6, Hk=2, D=16, dtype=torch.float32, seed=9)
        out = decode_attention(case.q, case.kv_cache, case.meta, case.scale)
        torch.testing.assert_close(out.double(), case.expected(), atol=1e-5, rtol=1e-5)
        monkeypatch.setenv(BACKEND_ENV, "native")
        with pytest.raises(RuntimeError, match="unavailable"):
            decode_attention(case.q, case.kv_cache, case.meta, case.scale)
    finally:
        native.forget("decode_attention")


def test_failed_compile_is_reported(monkeypatch, tmp_path):
    """A compiler that exists but fails: unavailable, with the reason."""
    fake = tmp_path / "bin" / "fake-cxx"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'fake-cxx 1.0'\n[ \"$1\" = --version ] && exit 0\necho 'error: no' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv(native.CXX_ENV, str(fake))
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    native.forget("decode_attention")
    try:
        build = native.load("decode_attention")
        assert build.library is None and "failed" in build.error and "error: no" in build.error
        assert not list((tmp_path / "cache" / "kernels").glob("*.so"))  # no half-built file left behind
    finally:
        native.forget("decode_attention")


@needs_compiler
def test_an_unwritable_cache_falls_back_to_a_temporary_dir(monkeypatch, tmp_path):
    """A read-only home must not cost the native kernels: the build goes to a per-user temp dir."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.delenv(native.CACHE_ENV, raising=False)
    monkeypatch.setattr(native, "cache_dir", lambda: blocker / "kernels")  # mkdir fails even as root
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    native.forget("decode_attention")
    try:
        build = native.load("decode_attention")
        assert build.library is not None, build.error
        assert build.path.parent.parent.parent == tmp_path / "tmp"
    finally:
        native.forget("decode_attention")
