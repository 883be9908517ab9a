"""Batched attention of short prompt chunks over cached context (engine/model/chunk_attention.py)
against the reference: SDPA one chunk at a time (what paged_attention runs when nothing is batched)."""
from __future__ import annotations

import pytest
import torch

from loragate.engine.model import chunk_attention
from loragate.engine.model.attention import AttentionMetadata, PrefillChunk, paged_attention
from loragate.kernels import native

D = 16


def make_step(shapes, Hk, dtype, seed=0, fresh=()):
    """A cache and a flat batch of prefill chunks: shapes = [(tokens, context)], each chunk's context
    spread over random slots; chunks whose index is in `fresh` are whole prompts."""
    g = torch.Generator().manual_seed(seed)
    total = sum(ctx for _, ctx in shapes)
    slots = total + 37
    cache = torch.randn(2 * Hk, slots, D, generator=g).to(dtype)
    perm = torch.randperm(slots, generator=g)
    chunks, written, row, used = [], [], 0, 0
    for i, (n, ctx) in enumerate(shapes):
        kv_index = perm[used:used + ctx]
        used += ctx
        written.append(kv_index[ctx - n:])  # the chunk's own tokens are its context's last n
        is_fresh = i in fresh
        chunks.append(PrefillChunk(row, row + n, torch.empty(0, dtype=torch.long) if is_fresh else kv_index,
                                   fresh=is_fresh))
        row += n
    slot_mapping = torch.cat(written)
    return cache, chunks, slot_mapping, row


def attend(q, kv, cache, chunks, slot_mapping, batched):
    meta = AttentionMetadata(slot_mapping=slot_mapping, prefills=chunks)
    if not batched:
        meta._chunk_plan = ([], list(chunks))  # the reference: every chunk through SDPA alone
    out = paged_attention(q, kv, cache.clone(), meta, scale=D ** -0.5, native=False)
    return out, meta


@pytest.mark.parametrize("Hq,Hk", [(6, 2), (4, 4)])
def test_batched_chunks_match_sdpa_per_chunk(Hq, Hk, monkeypatch):
    monkeypatch.setattr(chunk_attention, "BATCHED_DTYPES", (torch.float32,))
    # mixed lengths and contexts: padding of rows and of contexts, a one-token chunk, a chunk that
    # is its whole context minus one token, and a fresh prompt and a long chunk left to SDPA
    shapes = [(5, 40), (1, 33), (7, 48), (3, 45), (12, 13), (2, 35), (70, 90), (9, 9)]
    cache, chunks, slot_mapping, T = make_step(shapes, Hk, torch.float32, fresh=(7,))
    g = torch.Generator().manual_seed(1)
    q = torch.randn(T, Hq, D, generator=g)
    kv = torch.randn(T, 2 * Hk, D, generator=g)
    ref, _ = attend(q, kv, cache, chunks, slot_mapping, batched=False)
    out, meta = attend(q, kv, cache, chunks, slot_mapping, batched=True)
    groups, alone = meta.chunk_plan(Hk, Hq // Hk, torch.float32)
    assert groups and sum(g.num_chunks for g in groups) >= 4  # short chunks went batched
    assert chunks[6] in alone and chunks[7] in alone  # the long chunk and the fresh prompt did not
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bfloat16_batched_is_as_close_to_float32_as_sdpa_is(monkeypatch):
    # the batched torch form (the native kernel, taken by default on AVX-512 BF16, has its own tests)
    monkeypatch.setenv(native.BACKEND_ENV, "torch")
    Hq, Hk = 9, 3
    shapes = [(28, 300)] * 6 + [(20, 280), (4, 310)]
    cache, chunks, slot_mapping, T = make_step(shapes, Hk, torch.float32, seed=3)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(T, Hq, D, generator=g)
    kv = torch.randn(T, 2 * Hk, D, generator=g)
    exact, _ = attend(q, kv, cache, chunks, slot_mapping, batched=False)
    bf = lambda t: t.to(torch.bfloat16)
    ref, _ = attend(bf(q), bf(kv), bf(cache), chunks, slot_mapping, batched=False)
    out, meta = attend(bf(q), bf(kv), bf(cache), chunks, slot_mapping, batched=True)
    plans = meta.chunk_plan(Hk, Hq // Hk, torch.bfloat16)[0]
    assert plans and all(isinstance(p, chunk_attention.ChunkGroup) for p in plans), "bf16 chunks are batched"
    err_ref = (ref.float() - exact).abs().max().item()
    err = (out.float() - exact).abs().max().item()
    assert err <= max(2 * err_ref, 2e-2), (err, err_ref)


def test_plan_keeps_padding_and_size_bounded(monkeypatch):
    mk = lambda n, ctx: PrefillChunk(0, n, torch.arange(ctx), fresh=False)
    # contexts far apart are not padded to each other
    groups, alone = chunk_attention.plan_groups([mk(4, 32), mk(4, 36), mk(4, 2000), mk(4, 2040)],
                                                torch.device("cpu"), 2, 2)
    assert sorted(g.max_context for g in groups) == [36, 2040] and not alone
    # a chunk over the SHORT_CHUNK limit and a lone short chunk are attended alone
    long = mk(chunk_attention.SHORT_CHUNK + 1, 200)
    groups, alone = chunk_attention.plan_groups([long, mk(3, 50)], torch.device("cpu"), 2, 2)
    assert groups == [] and len(alone) == 2
    # the score tensor of a group is capped
    monkeypatch.setattr(chunk_attention, "MAX_GROUP_SCORES", 4 * 2 * 2 * 8 * 100)
    groups, alone = chunk_attention.plan_groups([mk(8, 100)] * 9, torch.device("cpu"), 2, 2)
    assert [g.num_chunks for g in groups] == [4, 4] and len(alone) == 1
    for g in groups:
        assert g.num_chunks * 2 * g.max_tokens * 2 * g.max_context <= chunk_attention.MAX_GROUP_SCORES
