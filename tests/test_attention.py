"""Decode attention over the paged cache against a plain per-sequence softmax attention."""
from __future__ import annotations

import pytest
import torch

from loragate.engine.model import attention
from loragate.engine.model.attention import AttentionMetadata, decode_attention


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3, 40])
def test_decode_attention_matches_reference(dtype, batch, monkeypatch):
    """Covers the float32-math path of small reduced-precision batches and the native-dtype path
    of large ones (the threshold is lowered so both run on small shapes), GQA, and sequences of
    different lengths padded to whole blocks with scrambled block tables."""
    monkeypatch.setattr(attention, "SMALL_DECODE_ROWS", 256)
    g = torch.Generator().manual_seed(batch)
    Hq, Hk, D, block, num_blocks = 6, 2, 16, 4, 128
    kv_cache = torch.randn(2 * Hk, num_blocks * block, D, generator=g).to(dtype)
    blocks = torch.randperm(num_blocks, generator=g)
    lens = torch.randint(1, 20, (batch,), generator=g).tolist()
    L = -(-max(lens) // block) * block
    tables, kv_index, nxt = [], [], 0
    for n in lens:
        nb = -(-n // block)
        tables.append(blocks[nxt:nxt + nb])
        nxt += nb
        pos = torch.arange(n)
        kv_index.append(tables[-1][pos // block] * block + pos % block)
    padded = torch.zeros(batch, L, dtype=torch.long)
    mask = torch.zeros(batch, 1, 1, L, dtype=torch.bool)
    for b, idx in enumerate(kv_index):
        padded[b, : len(idx)] = idx
        mask[b, ..., : len(idx)] = True
    meta = AttentionMetadata(slot_mapping=torch.zeros(batch, dtype=torch.long), decode_rows=torch.arange(batch),
                             decode_kv_index=padded, decode_mask=mask)
    q = torch.randn(batch, Hq, D, generator=g).to(dtype)
    out = decode_attention(q, kv_cache, meta, D ** -0.5)
    assert out.shape == q.shape and out.dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out.double(), reference(q, kv_cache, kv_index, D ** -0.5), **tol)
