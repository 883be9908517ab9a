"""Attention over a paged KV cache for a flat batch that mixes prefill chunks and decodes.

Decode tokens (one query per sequence) are attended in one batched call: each sequence's cached
keys are gathered through its block table into a padded [B, L] index, masked past its length.
Prefill chunks are attended one sequence at a time with a bottom-right causal mask (the chunk's
queries sit at the end of the sequence's context), which covers plain prefill, chunked prefill
and recompute after preemption with one code path; on the CPU, short chunks over cached context
(a burst of requests after their cached prefixes) are attended together instead, by a fused
native kernel or batched matmuls (chunk_attention.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from loragate.engine.kv_cache import context_rows
from loragate.engine.model import chunk_attention
from loragate.kernels import chunk_attention as native_chunks
from loragate.kernels.decode_attention import decode_attention_native, use_native


@dataclass
class PrefillChunk:
    """A run of query tokens of one sequence: flat-batch rows [start, end), context length ctx."""

    start: int
    end: int
    kv_index: torch.Tensor  # [ctx] cache slots of the whole context, this chunk's tokens included
    fresh: bool  # the chunk is the whole context: attend to the freshly computed k/v directly
    _mask: torch.Tensor | None = field(default=None, repr=False)

    def mask(self) -> torch.Tensor:
        """The bottom-right causal mask [n, ctx] of a chunk that follows computed context (a later
        chunk of a long prompt, a prompt after its cached prefix): built by the first layer and
        shared by the others."""
        if self._mask is None:
            n, ctx = self.end - self.start, self.kv_index.numel()
            self._mask = torch.ones(n, ctx, dtype=torch.bool, device=self.kv_index.device).tril(diagonal=ctx - n)
        return self._mask


@dataclass
class AttentionMetadata:
    """Per-step attention inputs, built once by the engine and shared by every layer."""

    slot_mapping: torch.Tensor  # [T] cache slot each token's k/v is written to
    decode_rows: torch.Tensor | None = None  # [Bd] flat-batch rows that are single-token decodes
    decode_kv_index: torch.Tensor | None = None  # [Bd, L] cache slots, padded
    decode_mask: torch.Tensor | None = None  # [Bd, 1, 1, L] True where attendable
    decode_lens: torch.Tensor | None = None  # [Bd] int64 context lengths (the native kernel reads these, not the mask)
    prefills: list[PrefillChunk] = field(default_factory=list)
    _decode_bias: torch.Tensor | None = field(default=None, repr=False)
    _decode_gather: torch.Tensor | None = field(default=None, repr=False)
    _chunk_plan: tuple[list, list] | None = field(default=None, repr=False)

    def chunk_plan(self, num_kv_heads: int, group: int, dtype: torch.dtype) -> tuple[list, list[PrefillChunk]]:
        """The prefill chunks as (batched plans of short chunks over cached context, each with an
        `attend(q, kv_cache, scale, out)`; the chunks attended one at a time), planned by the first
        layer and reused by the others. On the CPU the short chunks go to the fused native kernel
        where it is fast (`chunk_attention.plan_native`), else to batched matmuls in the dtypes where
        those measured faster (`chunk_attention.BATCHED_DTYPES`); elsewhere every chunk is alone."""
        if self._chunk_plan is None:
            cached = [c for c in self.prefills if not c.fresh]
            fresh = [c for c in self.prefills if c.fresh]
            device = self.slot_mapping.device
            if cached and native_chunks.use_native(dtype, device):
                plans, alone = chunk_attention.plan_native(cached)
                self._chunk_plan = (plans, fresh + alone)
            elif len(cached) > 1 and device.type == "cpu" and dtype in chunk_attention.BATCHED_DTYPES:
                groups, alone = chunk_attention.plan_groups(cached, device, num_kv_heads, group)
                self._chunk_plan = (groups, fresh + alone)
            else:
                self._chunk_plan = ([], self.prefills)
        return self._chunk_plan

    def decode_bias(self, num_kv_heads: int, group: int, dtype: torch.dtype) -> torch.Tensor:
        """The decode mask as an additive bias [Bd*Hk, group, L] (0 or -inf) in the layout of the
        score matmul, built by the first layer and reused by the others (metadata lives one step,
        and every layer of a model has the same heads and attention dtype)."""
        if self._decode_bias is None or self._decode_bias.dtype != dtype:
            B, L = self.decode_kv_index.shape
            flat = torch.zeros(B, L, dtype=dtype, device=self.decode_kv_index.device)
            flat.masked_fill_(~self.decode_mask.reshape(B, L), float("-inf"))
            bias = flat.view(B, 1, 1, L).expand(B, num_kv_heads, group, L)
            self._decode_bias = bias.reshape(B * num_kv_heads, group, L)
        return self._decode_bias

    def decode_gather(self, num_kv_heads: int, num_slots: int) -> torch.Tensor:
        """Rows [2*Bd*Hk*L] of the cache viewed flat that hold every decoding sequence's context,
        keys then values (`kv_cache.context_rows`): gathered in one go, its two halves are the
        [Bd*Hk, L, D] key and value operands of the batched matmuls as they are. Built once a step."""
        if self._decode_gather is None:
            self._decode_gather = context_rows(self.decode_kv_index, num_kv_heads, num_slots)
        return self._decode_gather


def write_kv(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, kv: torch.Tensor) -> None:
    """Store this step's keys and values ([T, 2*Hk, D], keys first) at their slots of the layer's
    head-major cache [2*Hk, slots, D]: one copy for both."""
    kv_cache.index_copy_(1, slot_mapping, kv.transpose(0, 1))


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D] (rope applied)
    kv: torch.Tensor,  # [T, 2*Hk, D]: keys (rope applied), then values
    kv_cache: torch.Tensor,  # [2*Hk, slots, D]: keys, then values
    meta: AttentionMetadata,
    scale: float,
    native: bool | None = None,
) -> torch.Tensor:
    """Write this step's k/v into the cache, then attend. Returns [T, Hq*D]. `native`: whether
    decodes run the native CPU kernel (the model decides once a step; None: decide here)."""
    T, Hq, D = q.shape
    Hk = kv.shape[1] // 2
    group = Hq // Hk
    decodes = meta.decode_rows is not None and meta.decode_rows.numel() > 0
    if native is None:
        native = use_native(q)
    native = native and meta.decode_lens is not None
    if decodes and not meta.prefills and native:
        # the steady state on the CPU: the write and the attention are one native call
        return decode_attention_native(q, kv_cache, meta.decode_kv_index, meta.decode_lens, scale, kv,
                                       meta.slot_mapping).view(T, Hq * D)
    write_kv(kv_cache, meta.slot_mapping, kv)
    attend = decode_attention_native_meta if native else decode_attention_torch
    if decodes and not meta.prefills:  # a pure decode step: rows are in order
        return attend(q, kv_cache, meta, scale).view(T, Hq * D)
    out = torch.empty_like(q)
    if decodes:
        decoded = attend(q.index_select(0, meta.decode_rows), kv_cache, meta, scale)
        out.index_copy_(0, meta.decode_rows, decoded)
    plans, alone = meta.chunk_plan(Hk, group, q.dtype)
    for plan in plans:
        plan.attend(q, kv_cache, scale, out)
    for chunk in alone:
        # 4-D inputs with KV heads repeated up to the query heads: with 3-D or GQA inputs the CPU
        # SDPA falls back to its math path (measured ~2.7x slower on a 70-token prefill)
        qp = q[chunk.start:chunk.end].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
        if chunk.fresh:
            kp, vp = kv[chunk.start:chunk.end].transpose(0, 1).split(Hk)  # [Hk, n, D] each
            mask = None
        else:
            kp, vp = kv_cache.index_select(1, chunk.kv_index).split(Hk)  # [Hk, ctx, D] each
            mask = chunk.mask()
        kp = kp.unsqueeze(0)
        vp = vp.unsqueeze(0)
        # a masked chunk on the CPU lets SDPA share KV heads itself rather than copying the whole
        # context per query head (same result; measured 2-4x faster for a few dozen tokens over a
        # 1k-token cached context, the common chunk once prefixes are cached)
        gqa = group > 1 and mask is not None and q.device.type == "cpu"
        if group > 1 and not gqa:
            kp = kp.repeat_interleave(group, dim=1)
            vp = vp.repeat_interleave(group, dim=1)
        op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, is_causal=mask is None, scale=scale,
                                            enable_gqa=gqa)
        out[chunk.start:chunk.end] = op[0].transpose(0, 1)
    return out.reshape(T, Hq * D)


# Below this many gathered context rows (sequences x KV heads x padded length), decode attention
# on the CPU runs its two small matmuls in float32 even for a bf16/fp16 cache: oneDNN's
# reduced-precision batched matmul has a fixed cost of tens of microseconds a call that float32
# GEMM does not, and at these sizes that cost is most of the work (measured on a 2-core AVX-512
# host in a decode step: 1 sequence 150 -> 98 us a layer, 8 sequences x 48 tokens 210 -> 170 us;
# break-even near 2-3k rows, where the doubled bytes of the upcast operands start to dominate).
SMALL_DECODE_ROWS = 2048


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """One query per sequence against its paged context: [B, Hq, D] -> [B, Hq, D]. On the CPU the
    fused native kernel (loragate.kernels.decode_attention) when it built, else the torch path."""
    if meta.decode_lens is not None and use_native(q):
        return decode_attention_native_meta(q, kv_cache, meta, scale)
    return decode_attention_torch(q, kv_cache, meta, scale)


def decode_attention_native_meta(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                                 scale: float) -> torch.Tensor:
    return decode_attention_native(q, kv_cache, meta.decode_kv_index, meta.decode_lens, scale)


def decode_attention_torch(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """One query per sequence against its gathered context: [B, Hq, D] -> [B, Hq, D]. The CUDA
    path, the CPU fallback, and the native kernel's test oracle.

    Written out as two batched matmuls rather than SDPA: for a single query row the fused kernels
    cost more in set-up than the work itself (measured ~3x slower on the CPU at batch 64). The
    batch of the matmuls is (sequence, KV head), in that order, so the queries [B, Hq, D] are
    already [B*Hk, g, D] (query heads sharing a KV head, GQA, ride along as rows of one matmul)
    and the result is already [B, Hq, D]: no transposing copies. The head-major cache viewed flat
    is gathered in one go straight into the [B*Hk, L, D] key and value operands
    (`AttentionMetadata.decode_gather`), and the scale and padding mask are folded into the first
    matmul (`baddbmm` with the step's bias).
    """
    B, Hq, D = q.shape
    dtype = q.dtype
    Hk = kv_cache.shape[0] // 2
    gather = meta.decode_gather(Hk, kv_cache.shape[1])
    rows = gather.numel() // 2
    L = rows // (B * Hk)
    ctx = kv_cache.view(-1, D).index_select(0, gather)
    if q.device.type == "cpu" and q.dtype != torch.float32 and rows <= SMALL_DECODE_ROWS:
        q, ctx = q.float(), ctx.float()  # q is a strided view: float() is the copy reshape would make
    k, v = ctx.view(2, B * Hk, L, D).unbind(0)
    qh = q.reshape(B * Hk, Hq // Hk, D)
    bias = meta.decode_bias(Hk, Hq // Hk, qh.dtype)
    probs = torch.softmax(torch.baddbmm(bias, qh, k.transpose(1, 2), alpha=scale), dim=-1)
    return torch.bmm(probs, v).view(B, Hq, D).to(dtype)
