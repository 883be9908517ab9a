"""Attention over a paged KV cache for a flat batch that mixes prefill chunks and decodes.

Decode tokens (one query per sequence) are attended in one batched call: each sequence's cached
keys are gathered through its block table into a padded [B, L] index, masked past its length.
Prefill chunks are attended one sequence at a time with a bottom-right causal mask (the chunk's
queries sit at the end of the sequence's context), which covers plain prefill, chunked prefill
and recompute after preemption with one code path.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    """A run of query tokens of one sequence: flat-batch rows [start, end), context length ctx."""

    start: int
    end: int
    kv_index: torch.Tensor  # [ctx] cache slots of the whole context, this chunk's tokens included
    fresh: bool  # the chunk is the whole context: attend to the freshly computed k/v directly


@dataclass
class AttentionMetadata:
    """Per-step attention inputs, built once by the engine and shared by every layer."""

    slot_mapping: torch.Tensor  # [T] cache slot each token's k/v is written to
    decode_rows: torch.Tensor | None = None  # [Bd] flat-batch rows that are single-token decodes
    decode_kv_index: torch.Tensor | None = None  # [Bd, L] cache slots, padded
    decode_mask: torch.Tensor | None = None  # [Bd, 1, 1, L] True where attendable
    prefills: list[PrefillChunk] = field(default_factory=list)


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D] (rope applied)
    k: torch.Tensor,  # [T, Hk, D]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [slots, Hk, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Write this step's k/v into the cache, then attend. Returns [T, Hq*D]."""
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    T, Hq, D = q.shape
    out = torch.empty_like(q)
    if meta.decode_rows is not None and meta.decode_rows.numel():
        out.index_copy_(0, meta.decode_rows, decode_attention(q.index_select(0, meta.decode_rows), k_cache, v_cache,
                                                              meta.decode_kv_index, meta.decode_mask, scale))
    group = Hq // k.shape[1]
    for chunk in meta.prefills:
        # 4-D inputs with KV heads repeated up to the query heads: with 3-D or GQA inputs the CPU
        # SDPA falls back to its math path (measured ~2.7x slower on a 70-token prefill)
        qp = q[chunk.start:chunk.end].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
        if chunk.fresh:
            kp, vp = k[chunk.start:chunk.end], v[chunk.start:chunk.end]  # [n, Hk, D]
            mask = None
        else:
            kp = k_cache.index_select(0, chunk.kv_index)  # [ctx, Hk, D]
            vp = v_cache.index_select(0, chunk.kv_index)
            n, ctx = chunk.end - chunk.start, chunk.kv_index.numel()
            mask = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril(diagonal=ctx - n)
        kp = kp.transpose(0, 1).unsqueeze(0)
        vp = vp.transpose(0, 1).unsqueeze(0)
        if group > 1:
            kp = kp.repeat_interleave(group, dim=1)
            vp = vp.repeat_interleave(group, dim=1)
        op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, is_causal=mask is None, scale=scale)
        out[chunk.start:chunk.end] = op[0].transpose(0, 1)
    return out.reshape(T, Hq * D)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_index: torch.Tensor,
                     mask: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per sequence against its gathered context: [B, Hq, D] -> [B, Hq, D].

    Written out as two batched matmuls rather than SDPA: for a single query row the fused kernels
    cost more in set-up than the work itself (measured ~3x slower on the CPU at batch 64). Pages
    are gathered with index_select (several times cheaper than advanced indexing) from the
    slot-major cache, then laid out per head so both matmuls read contiguous memory; query heads
    sharing a KV head (GQA) ride along as rows of the same matmul.
    """
    B, Hq, D = q.shape
    L = kv_index.shape[1]
    Hk = k_cache.shape[1]
    flat = kv_index.reshape(-1)
    k = k_cache.index_select(0, flat).view(B, L, Hk, D).permute(0, 2, 3, 1).contiguous()  # [B, Hk, D, L]
    v = v_cache.index_select(0, flat).view(B, L, Hk, D).transpose(1, 2).contiguous()  # [B, Hk, L, D]
    scores = torch.matmul(q.view(B, Hk, Hq // Hk, D), k).float().mul_(scale)  # [B, Hk, g, L]
    scores.masked_fill_(~mask.view(B, 1, 1, L), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(B, Hq, D)
