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
    _decode_bias: torch.Tensor | None = field(default=None, repr=False)

    def decode_bias(self, num_kv_heads: int, group: int, dtype: torch.dtype) -> torch.Tensor:
        """The decode mask as an additive bias [Hk*Bd, group, L] (0 or -inf) in the layout of the
        score matmul, built by the first layer and reused by the others (metadata lives one step,
        and every layer of a model has the same heads and dtype)."""
        if self._decode_bias is None:
            B, L = self.decode_kv_index.shape
            flat = torch.zeros(B, L, dtype=dtype, device=self.decode_kv_index.device)
            flat.masked_fill_(~self.decode_mask.reshape(B, L), float("-inf"))
            self._decode_bias = flat.view(1, B, 1, L).expand(num_kv_heads, B, group, L).reshape(num_kv_heads * B, group, L)
        return self._decode_bias


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """Store this step's keys and values ([T, Hk, D]) at their slots of the head-major cache."""
    k_cache.index_copy_(1, slot_mapping, k.transpose(0, 1))
    v_cache.index_copy_(1, slot_mapping, v.transpose(0, 1))


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D] (rope applied)
    k: torch.Tensor,  # [T, Hk, D]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [Hk, slots, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Write this step's k/v into the cache, then attend. Returns [T, Hq*D]."""
    write_kv(k_cache, v_cache, meta.slot_mapping, k, v)
    T, Hq, D = q.shape
    Hk = k.shape[1]
    group = Hq // Hk
    decodes = meta.decode_rows is not None and meta.decode_rows.numel() > 0
    if decodes and not meta.prefills:  # a pure decode step (the steady state): rows are in order
        bias = meta.decode_bias(Hk, group, q.dtype)
        return decode_attention(q, k_cache, v_cache, meta.decode_kv_index, bias, scale).view(T, Hq * D)
    out = torch.empty_like(q)
    if decodes:
        bias = meta.decode_bias(Hk, group, q.dtype)
        out.index_copy_(0, meta.decode_rows, decode_attention(q.index_select(0, meta.decode_rows), k_cache, v_cache,
                                                              meta.decode_kv_index, bias, scale))
    for chunk in meta.prefills:
        # 4-D inputs with KV heads repeated up to the query heads: with 3-D or GQA inputs the CPU
        # SDPA falls back to its math path (measured ~2.7x slower on a 70-token prefill)
        qp = q[chunk.start:chunk.end].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
        if chunk.fresh:
            kp = k[chunk.start:chunk.end].transpose(0, 1)  # [Hk, n, D]
            vp = v[chunk.start:chunk.end].transpose(0, 1)
            mask = None
        else:
            kp = k_cache.index_select(1, chunk.kv_index)  # [Hk, ctx, D]
            vp = v_cache.index_select(1, chunk.kv_index)
            n, ctx = chunk.end - chunk.start, chunk.kv_index.numel()
            mask = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril(diagonal=ctx - n)
        kp = kp.unsqueeze(0)
        vp = vp.unsqueeze(0)
        if group > 1:
            kp = kp.repeat_interleave(group, dim=1)
            vp = vp.repeat_interleave(group, dim=1)
        op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, is_causal=mask is None, scale=scale)
        out[chunk.start:chunk.end] = op[0].transpose(0, 1)
    return out.reshape(T, Hq * D)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_index: torch.Tensor,
                     bias: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per sequence against its gathered context: [B, Hq, D] -> [B, Hq, D].

    Written out as two batched matmuls rather than SDPA: for a single query row the fused kernels
    cost more in set-up than the work itself (measured ~3x slower on the CPU at batch 64). The
    cache is head-major ([Hk, slots, D]), so one index_select per tensor gathers every sequence's
    pages straight into the [Hk*B, L, D] operand of the batched matmuls: no transposing copy of the
    context. Query heads sharing a KV head (GQA) ride along as rows of the same matmul, and the
    scale and padding mask are folded into the first matmul (`baddbmm` with the step's bias).
    """
    B, Hq, D = q.shape
    L = kv_index.shape[1]
    Hk = k_cache.shape[0]
    g = Hq // Hk
    flat = kv_index.reshape(-1)
    k = k_cache.index_select(1, flat).view(Hk * B, L, D)
    v = v_cache.index_select(1, flat).view(Hk * B, L, D)
    qh = q.view(B, Hk, g, D).transpose(0, 1).reshape(Hk * B, g, D)
    probs = torch.softmax(torch.baddbmm(bias, qh, k.transpose(1, 2), alpha=scale), dim=-1)
    return torch.bmm(probs, v).view(Hk, B, g, D).transpose(0, 1).reshape(B, Hq, D)
