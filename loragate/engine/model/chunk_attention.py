"""Attention of short prompt chunks over cached context, batched: the common prefill once prefixes
are cached.

With prefix caching a request computes only the few dozen tokens after its cached blocks, and a
burst of such requests (a customer's assistant, every turn starting with the same system prompt)
puts dozens of short chunks into one step, each attending to a context of a thousand tokens or
more. Attended one chunk at a time, SDPA's per-call set-up and its masked CPU path dominate:
profiled on a 2-core AVX-512 host, 32 chunks of 28 tokens over 1,048-token contexts took ~23 ms a
layer in bf16, half the step. Here such chunks are attended together in two batched matmuls and a
softmax whose batch is (chunk, KV head), the same layout the decode path uses
(`attention.decode_attention_torch`): the query heads that share a KV head ride along as rows of
one matmul (GQA without repeating keys), the contexts are gathered from the head-major cache in
one row copy, and the bottom-right causal mask plus the padding of shorter chunks and contexts is
an additive bias on the few columns it touches. The scores are computed in the cache's dtype, as
transformers' eager attention computes them.

Chunks are grouped so the padding stays bounded: only chunks of at most `SHORT_CHUNK` tokens are
batched, grouped by similar context length, and a group's score tensor is capped in size. Longer
chunks (a long prompt's later chunks) go through SDPA one at a time, where the per-call cost is
small against the work.

Where the CPU multiplies bf16 natively (AVX-512 BF16), the short chunks skip all of that and go to
one fused native call instead (`loragate.kernels.chunk_attention`, planned as a `NativeChunks`):
no gathered contexts, no padded scores, no separate mask and softmax passes. The batched torch
form above stays as the fallback on other hosts and as the kernel's oracle in the tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

from loragate.engine.kv_cache import context_rows
from loragate.kernels import chunk_attention as native_chunks

# Where batching measured faster than SDPA per chunk: in bench/prefix.py's burst step on a 2-core
# AVX-512 host (32 chunks of 28 tokens over 1,048-token contexts, SmolLM-135M shapes), bf16
# attention took 0.44 s of the step instead of 0.70 s (step 1.37 -> 1.10 s). In float32 the same
# batched matmuls ran no faster than SDPA's kernel (step 1.9 s either way), so float32 keeps SDPA.
BATCHED_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16,)
# Chunks with at most this many query tokens are batched (a prompt after its cached prefix, a
# recomputed tail); longer ones are attended alone.
SHORT_CHUNK = 64
# A group's padded score area may be at most this many times its chunks' real area.
MAX_PADDING = 1.5
# Cap on a group's score elements (batch x KV heads x padded rows x padded context): 32 MiB in
# bf16, so a burst over very long contexts is split rather than allocating gigabytes.
MAX_GROUP_SCORES = 16 << 20


@dataclass
class ChunkGroup:
    """Chunks attended in one batched call, with the per-step tensors every layer shares."""

    rows: torch.Tensor  # [B*N] flat-batch query row of each padded position (padding: the chunk's first row)
    valid: torch.Tensor  # [B*N] bool, True for real query positions
    out_rows: torch.Tensor  # [R] flat-batch rows of the real positions, in order of `valid`
    kv_slots: torch.Tensor  # [B, L] cache slots of each chunk's context, padded with the chunk's first slot
    allowed: torch.Tensor  # [B, N, L - mask_from] bool: query position n of chunk b may attend to context position l
    mask_from: int  # context positions before this one are attendable by every row of every chunk
    num_chunks: int
    max_tokens: int  # N
    max_context: int  # L
    _gather: torch.Tensor | None = None
    _bias: torch.Tensor | None = None

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, scale: float, out: torch.Tensor) -> None:
        attend_group(q, kv_cache, self, scale, out)

    def gather(self, num_kv_heads: int, num_slots: int) -> torch.Tensor:
        """Rows of the flat cache view holding every chunk's keys, then values
        (`kv_cache.context_rows`): one index_select gives the [B*Hk, L, D] operands."""
        if self._gather is None:
            self._gather = context_rows(self.kv_slots, num_kv_heads, num_slots)
        return self._gather

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask as an additive bias [B, 1, N, 1, L - mask_from] (0 or -inf) that broadcasts over
        the score tensor's masked columns viewed as [B, Hk, N, g, L - mask_from]; built by the first
        layer and reused by the others."""
        if self._bias is None or self._bias.dtype != dtype:
            B, N, W = self.allowed.shape
            flat = torch.zeros(B, N, W, dtype=dtype, device=self.allowed.device)
            self._bias = flat.masked_fill_(~self.allowed, float("-inf")).view(B, 1, N, 1, W)
        return self._bias


@dataclass
class NativeChunks:
    """Short chunks over cached context for the fused native kernel: per chunk its first query row,
    its tokens, its context length and where its slots start in the concatenated `kv_index`."""

    q_start: torch.Tensor  # [C] int64
    lens: torch.Tensor  # [C] int64
    ctxs: torch.Tensor  # [C] int64
    kv_offsets: torch.Tensor  # [C] int64
    kv_index: torch.Tensor  # [sum ctxs] int64

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, scale: float, out: torch.Tensor) -> None:
        native_chunks.chunk_attention_native(q, kv_cache, self.kv_index, self.q_start, self.lens, self.ctxs,
                                             self.kv_offsets, scale, out)


def plan_native(chunks: list) -> tuple[list[NativeChunks], list]:
    """The step's chunks over cached context as one native call for the short ones and the rest
    (longer chunks, attended alone by SDPA, as on the torch path)."""
    short = [c for c in chunks if c.end - c.start <= SHORT_CHUNK]
    rest = [c for c in chunks if c.end - c.start > SHORT_CHUNK]
    if not short:
        return [], rest
    ctxs = [c.kv_index.numel() for c in short]
    plan = NativeChunks(q_start=torch.tensor([c.start for c in short]),
                        lens=torch.tensor([c.end - c.start for c in short]), ctxs=torch.tensor(ctxs),
                        kv_offsets=torch.tensor([0, *accumulate(ctxs[:-1])]),
                        kv_index=torch.cat([c.kv_index.reshape(-1) for c in short]).to(torch.int64).contiguous())
    return [plan], rest


def plan_groups(chunks: list, device: torch.device, num_kv_heads: int, group: int) -> tuple[list[ChunkGroup], list]:
    """Split the step's chunks over cached context into batched groups and the rest (returned as
    they are, for one-at-a-time attention). `chunks` are `attention.PrefillChunk`s."""
    short = sorted((c for c in chunks if c.end - c.start <= SHORT_CHUNK), key=lambda c: c.kv_index.numel())
    rest = [c for c in chunks if c.end - c.start > SHORT_CHUNK]
    groups: list[ChunkGroup] = []
    members: list = []
    real = 0

    def flush() -> None:
        if len(members) == 1:
            rest.append(members[0])  # alone, SDPA does as well and pads nothing
        elif members:
            groups.append(_build(members, device))
        members.clear()

    for c in short:
        n, ctx = c.end - c.start, c.kv_index.numel()
        if members:
            N = max(n, max(m.end - m.start for m in members))
            L = ctx  # sorted by context: this one is the longest so far
            padded = (len(members) + 1) * N * L
            if padded > MAX_PADDING * (real + n * ctx) or padded * num_kv_heads * group > MAX_GROUP_SCORES:
                flush()
                real = 0
        members.append(c)
        real += n * ctx
    flush()
    return groups, rest


def _build(chunks: list, device: torch.device) -> ChunkGroup:
    B = len(chunks)
    N = max(c.end - c.start for c in chunks)
    L = max(c.kv_index.numel() for c in chunks)
    pos = torch.arange(N)
    starts = torch.tensor([c.start for c in chunks])
    lens = torch.tensor([c.end - c.start for c in chunks])
    ctxs = torch.tensor([c.kv_index.numel() for c in chunks])
    valid = pos.unsqueeze(0) < lens.unsqueeze(1)  # [B, N]
    rows = torch.where(valid, starts.unsqueeze(1) + pos, starts.unsqueeze(1))
    slots = torch.stack([torch.nn.functional.pad(c.kv_index.cpu(), (0, L - c.kv_index.numel()),
                                                 value=int(c.kv_index[0])) for c in chunks])
    # Query position p of a chunk of n tokens over ctx sits at context position ctx - n + p. Only
    # the columns from the earliest such first query on are masked anywhere (the causal corner and
    # the padding of shorter contexts): with cached context that is the last few dozen of a
    # thousand, so the mask costs a sliver of the scores. Chunks over cached context have
    # ctx > n, so every row, padding included, keeps column 0 and no softmax row is all -inf.
    mask_from = int((ctxs - lens).min())
    last = (ctxs - lens).view(B, 1, 1) + pos.view(1, N, 1)  # [B, N, 1] the last attendable position
    keys = torch.arange(mask_from, L).view(1, 1, L - mask_from)
    allowed = (keys <= last) & (keys < ctxs.view(B, 1, 1))
    flat_valid = valid.reshape(-1)
    return ChunkGroup(rows=rows.reshape(-1).to(device), valid=flat_valid.to(device),
                      out_rows=rows.reshape(-1)[flat_valid].to(device), kv_slots=slots.to(device),
                      allowed=allowed.to(device), mask_from=mask_from, num_chunks=B, max_tokens=N, max_context=L)


def attend_group(q: torch.Tensor, kv_cache: torch.Tensor, g: ChunkGroup, scale: float, out: torch.Tensor) -> None:
    """softmax(q k^T * scale + mask) v for every chunk of the group, written to its rows of `out`.
    q, out: [T, Hq, D]; kv_cache: [2*Hk, slots, D] (keys, then values)."""
    _, Hq, D = q.shape
    Hk = kv_cache.shape[0] // 2
    group = Hq // Hk
    B, N, L = g.num_chunks, g.max_tokens, g.max_context
    # [B*N, Hq, D] -> [B, Hk, N*g, D]: the g query heads of a KV head become rows, token-major
    qh = q.index_select(0, g.rows).view(B, N, Hk, group, D).permute(0, 2, 1, 3, 4).reshape(B * Hk, N * group, D)
    ctx = kv_cache.view(-1, D).index_select(0, g.gather(Hk, kv_cache.shape[1]))
    k, v = ctx.view(2, B * Hk, L, D).unbind(0)
    # scale folded into the (small) queries, the mask added in place with a broadcast to the masked
    # columns only: measured ~1.5x faster than baddbmm with a materialized [B*Hk, N*g, L] bias on
    # a 2-core AVX-512 host
    scores = torch.bmm(qh * scale, k.transpose(1, 2))
    scores.view(B, Hk, N, group, L)[..., g.mask_from:].add_(g.bias(q.dtype))
    probs = torch.softmax(scores, dim=-1)
    o = torch.bmm(probs, v).view(B, Hk, N, group, D).permute(0, 2, 1, 3, 4).reshape(B * N, Hq, D)
    out.index_copy_(0, g.out_rows, o[g.valid])
