"""The fused native kernel for short prompt chunks over a paged cache (kernels/csrc/chunk_attention.cpp)
against float32 SDPA one chunk at a time, on every arithmetic path this host can run (AVX-512 BF16
pair dot products, their AVX-512 emulation, plain loops), and the engine's choice of it."""
from __future__ import annotations

import pytest
import torch
from native_marks import needs_compiler

from loragate.engine import host
from loragate.engine.model import chunk_attention
from loragate.engine.model.attention import (
    AttentionMetadata,
    PrefillChunk,
    paged_attention,
)
from loragate.kernels import chunk_attention as native_chunks
from loragate.kernels import native

# (tokens, context): a one-token chunk, a chunk that is its whole context, contexts on and off the
# kernel's 16-key vectors and 64-key blocks, query rows (tokens x group) that fill its 5-row tiles
# unevenly and span several 96-row items, the longest chunk the engine sends it
SHAPES = [(1, 1), (5, 8), (3, 64), (7, 65), (11, 11), (28, 130), (2, 129), (64, 200), (1, 300), (16, 17)]


def build(shapes, Hq, Hk, D, seed=0):
    """A bf16 cache whose slots outside every context hold NaN (a read outside the index poisons the
    output), strided queries, and the chunks' rows with a one-row gap between chunks."""
    g = torch.Generator().manual_seed(seed)
    total = sum(ctx for _, ctx in shapes)
    slots = total + 50
    cache = torch.full((2 * Hk, slots, D), float("nan"))
    perm = torch.randperm(slots, generator=g)
    q_start, lens, ctxs, offsets, index, row = [], [], [], [], [], 0
    for n, ctx in shapes:
        idx = perm[sum(ctxs):sum(ctxs) + ctx]
        cache[:, idx] = torch.randn(2 * Hk, ctx, D, generator=g)
        offsets.append(sum(ctxs))
        q_start.append(row)
        lens.append(n)
        ctxs.append(ctx)
        index.append(idx)
        row += n + 1
    qkv = torch.randn(row, (Hq + 2 * Hk) * D, generator=g).to(torch.bfloat16)
    q = qkv[:, :Hq * D].view(row, Hq, D)  # rows strided, as the model's q is a view of its qkv buffer
    t = lambda xs: torch.tensor(xs, dtype=torch.int64)
    return q, cache.to(torch.bfloat16), torch.cat(index), t(q_start), t(lens), t(ctxs), t(offsets)


def reference(q, cache, index, q_start, lens, ctxs, offsets, scale):
    """float32 SDPA of each chunk over its context with the bottom-right causal mask."""
    T, Hq, D = q.shape
    Hk = cache.shape[0] // 2
    out = torch.zeros(T, Hq, D)
    for s, n, ctx, off in zip(q_start.tolist(), lens.tolist(), ctxs.tolist(), offsets.tolist()):
        kv = cache[:, index[off:off + ctx]].float()
        k = kv[:Hk].repeat_interleave(Hq // Hk, 0)
        v = kv[Hk:].repeat_interleave(Hq // Hk, 0)
        mask = torch.ones(n, ctx, dtype=torch.bool).tril(ctx - n)
        qq = q[s:s + n].float().transpose(0, 1)
        out[s:s + n] = torch.nn.functional.scaled_dot_product_attention(qq, k, v, attn_mask=mask,
                                                                        scale=scale).transpose(0, 1)
    return out


@pytest.fixture(params=["default", "avx512", "portable"])
def chunk_path(request, monkeypatch):
    """Each arithmetic path the host runs: the default build's, the AVX-512 emulation, plain loops."""
    if native.compiler() is None:
        pytest.skip("no C++ compiler on this host")
    if request.param == "avx512" and not host.detect().features.avx512:
        pytest.skip("this CPU cannot run the AVX-512 path")
    if request.param != "default":
        monkeypatch.setenv(native.ISA_ENV, request.param)
    found = native_chunks.path()
    assert found is not None, native.load(native_chunks.LIBRARY).error
    if request.param == "default":
        assert (found == native_chunks.FAST_PATH) == host.detect().features.avx512_bf16
    else:
        assert found == request.param
    return found


@pytest.mark.parametrize("Hq,Hk,D", [(9, 3, 64), (4, 4, 16), (8, 2, 128), (6, 2, 80)])
def test_native_chunks_match_float32_sdpa(Hq, Hk, D, chunk_path):
    q, cache, index, q_start, lens, ctxs, offsets = build(SHAPES, Hq, Hk, D)
    out = torch.full(q.shape, 7.0, dtype=torch.bfloat16)
    native_chunks.chunk_attention_native(q, cache, index, q_start, lens, ctxs, offsets, D ** -0.5, out)
    exact = reference(q, cache, index, q_start, lens, ctxs, offsets, D ** -0.5)
    rows = torch.cat([torch.arange(s, s + n) for s, n in zip(q_start.tolist(), lens.tolist())])
    gaps = torch.ones(q.shape[0], dtype=torch.bool)
    gaps[rows] = False
    assert (out[gaps] == 7.0).all()  # rows that are no chunk's are left as they were
    # bf16 output rounding (2^-9 relative) and bf16 probabilities; a mask off by one key moves the
    # short contexts' rows by far more
    torch.testing.assert_close(out[rows].float(), exact[rows], atol=2e-2, rtol=2e-2)


def test_native_is_as_close_to_float32_as_the_batched_torch_path():
    if native_chunks.path() is None:
        pytest.skip("the native chunk kernel is unavailable here")
    Hq, Hk, D = 9, 3, 64
    shapes = [(28, 300)] * 6 + [(20, 280), (4, 310)]
    q, cache, index, q_start, lens, ctxs, offsets = build(shapes, Hq, Hk, D, seed=3)
    out = torch.zeros(q.shape, dtype=torch.bfloat16)
    native_chunks.chunk_attention_native(q, cache, index, q_start, lens, ctxs, offsets, D ** -0.5, out)
    exact = reference(q, cache, index, q_start, lens, ctxs, offsets, D ** -0.5)
    chunks = [PrefillChunk(s, s + n, index[o:o + c], fresh=False)
              for s, n, c, o in zip(q_start.tolist(), lens.tolist(), ctxs.tolist(), offsets.tolist())]
    groups, _ = chunk_attention.plan_groups(chunks, torch.device("cpu"), Hk, Hq // Hk)
    batched = torch.zeros(q.shape, dtype=torch.bfloat16)
    for group in groups:
        chunk_attention.attend_group(q, cache, group, D ** -0.5, batched)
    rows = torch.cat([torch.arange(c.start, c.end) for c in chunks])
    err = (out[rows].float() - exact[rows]).abs().max().item()
    err_torch = (batched[rows].float() - exact[rows]).abs().max().item()
    assert err <= max(1.5 * err_torch, 1e-2), (err, err_torch)


@needs_compiler
def test_bad_arguments_are_refused_before_anything_is_written():
    q, cache, index, q_start, lens, ctxs, offsets = build([(3, 10), (2, 6)], 4, 2, 16)
    out = torch.zeros(q.shape, dtype=torch.bfloat16)
    call = lambda **kw: native_chunks.chunk_attention_native(
        kw.get("q", q), kw.get("cache", cache), kw.get("index", index), q_start, kw.get("lens", lens),
        kw.get("ctxs", ctxs), offsets, 0.25, kw.get("out", out))
    bad = index.clone()
    bad[4] = cache.shape[1]  # one slot past the cache
    with pytest.raises(RuntimeError, match="out of range"):
        call(index=bad)
    with pytest.raises(RuntimeError, match="out of range"):
        call(ctxs=torch.tensor([2, 6]))  # a context shorter than its chunk
    with pytest.raises(RuntimeError, match="out of range"):
        call(lens=torch.tensor([3, 9]))  # rows past the batch
    assert (out == 0).all()
    with pytest.raises(ValueError, match="bfloat16"):
        call(q=q.float(), cache=cache.float(), out=out.float())
    odd = build([(3, 10)], 2, 1, 12)
    with pytest.raises(RuntimeError, match="head_dim"):
        native_chunks.chunk_attention_native(*odd, 0.25, torch.zeros(odd[0].shape, dtype=torch.bfloat16))


def test_the_engine_takes_the_kernel_where_it_is_fast(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(native.BACKEND_ENV, raising=False)
    monkeypatch.delenv(native.ISA_ENV, raising=False)
    fast = native_chunks.path() == native_chunks.FAST_PATH
    assert native_chunks.use_native(torch.bfloat16, cpu) == fast
    assert not native_chunks.use_native(torch.float32, cpu)
    monkeypatch.setenv(native.BACKEND_ENV, "torch")
    assert not native_chunks.use_native(torch.bfloat16, cpu)
    if native_chunks.path() is not None:
        monkeypatch.setenv(native.BACKEND_ENV, "native")
        assert native_chunks.use_native(torch.bfloat16, cpu)
        assert not native_chunks.use_native(torch.float32, cpu)


@pytest.mark.parametrize("backend", [pytest.param("native", marks=needs_compiler), "torch"])
def test_paged_attention_plans_short_cached_chunks_for_the_backend(backend, monkeypatch):
    """Through paged_attention: bf16 short chunks over cached context go to one native call (or, on
    the torch backend, to batched groups); a fresh prompt and a long chunk are attended alone by
    SDPA either way, and the outputs agree with SDPA for every chunk."""
    monkeypatch.setenv(native.BACKEND_ENV, backend)
    Hq, Hk, D = 6, 2, 16
    shapes = [(5, 40), (1, 33), (7, 48), (3, 45), (70, 90), (9, 9)]
    g = torch.Generator().manual_seed(5)
    slots = sum(c for _, c in shapes) + 11
    cache = torch.randn(2 * Hk, slots, D, generator=g).to(torch.bfloat16)
    perm = torch.randperm(slots, generator=g)
    chunks, written, row, used = [], [], 0, 0
    for i, (n, ctx) in enumerate(shapes):
        idx = perm[used:used + ctx]
        used += ctx
        written.append(idx[ctx - n:])
        fresh = i == len(shapes) - 1
        chunks.append(PrefillChunk(row, row + n, torch.empty(0, dtype=torch.long) if fresh else idx, fresh=fresh))
        row += n
    q = torch.randn(row, Hq, D, generator=g).to(torch.bfloat16)
    kv = torch.randn(row, 2 * Hk, D, generator=g).to(torch.bfloat16)
    slot_mapping = torch.cat(written)
    meta = AttentionMetadata(slot_mapping=slot_mapping, prefills=chunks)
    out = paged_attention(q, kv, cache.clone(), meta, scale=D ** -0.5, native=False)
    plans, alone = meta.chunk_plan(Hk, Hq // Hk, torch.bfloat16)
    kind = chunk_attention.NativeChunks if backend == "native" else chunk_attention.ChunkGroup
    assert plans and all(isinstance(p, kind) for p in plans)
    assert chunks[4] in alone and chunks[5] in alone
    ref_meta = AttentionMetadata(slot_mapping=slot_mapping, prefills=chunks)
    ref_meta._chunk_plan = ([], list(chunks))  # every chunk through SDPA alone
    ref = paged_attention(q, kv, cache.clone(), ref_meta, scale=D ** -0.5, native=False)
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)
