"""The native chunk-attention kernel against the torch forms, on the shapes prefill produces.

bf16, SmolLM-135M heads (9 query heads over 3 KV heads, head_dim 64), a paged cache of 16-slot
blocks in random order, each chunk's context on blocks of its own. For each case, one layer's
attention of every chunk, best of --repeats, taking turns:
  native   `loragate.kernels.chunk_attention` (what the engine runs for chunks of at most
           `SHORT_CHUNK` tokens over cached context, where the CPU has AVX-512 BF16)
  batched  the batched torch matmuls (`engine.model.chunk_attention.attend_group`; short chunks only)
  sdpa     one `scaled_dot_product_attention` call per chunk with the bottom-right causal mask
           (what the engine runs for longer chunks and fresh prompts)
The first case is bench/prefix.py's burst; the others are longer chunks over cached context (a chat
turn after its history) and a fresh prompt (context = chunk), which the engine does not send to the
kernel yet.

    python -m bench.chunk_attention [--repeats 5]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bench.common import machine
from loragate.engine.model import chunk_attention
from loragate.engine.model.attention import PrefillChunk
from loragate.kernels import chunk_attention as native_chunks

HQ, HK, D = 9, 3, 64
BLOCK = 16  # the engine's default KV block size
CASES = ((32, 28, 1020), (4, 64, 1000), (2, 128, 1000), (1, 256, 1500), (1, 512, 2000), (1, 1024, 3000),
         (1, 2048, 2048))  # (chunks, tokens a chunk, context a chunk)


def case(chunks: int, n: int, ctx: int, repeats: int) -> dict[str, float]:
    """Best seconds of each form for `chunks` chunks of n tokens over ctx-token contexts."""
    g = torch.Generator().manual_seed(0)
    blocks = -(-chunks * ctx // BLOCK)
    cache = torch.randn(2 * HK, blocks * BLOCK, D, generator=g).to(torch.bfloat16)
    # the paged layout: each context runs through whole blocks of BLOCK slots, the blocks scattered
    index = (torch.randperm(blocks, generator=g) * BLOCK).repeat_interleave(BLOCK) + torch.arange(BLOCK).repeat(blocks)
    q = torch.randn(chunks * n, HQ, D, generator=g).to(torch.bfloat16)
    out = torch.zeros_like(q)
    i64 = lambda xs: torch.tensor(xs, dtype=torch.int64)
    starts, offsets = i64([c * n for c in range(chunks)]), i64([c * ctx for c in range(chunks)])
    lens, ctxs = i64([n] * chunks), i64([ctx] * chunks)
    parts = [PrefillChunk(c * n, (c + 1) * n, index[c * ctx:(c + 1) * ctx], fresh=False) for c in range(chunks)]
    mask = torch.ones(n, ctx, dtype=torch.bool).tril(ctx - n)

    def native() -> None:
        native_chunks.chunk_attention_native(q, cache, index, starts, lens, ctxs, offsets, D ** -0.5, out)

    short = n <= chunk_attention.SHORT_CHUNK and chunks > 1
    groups = chunk_attention.plan_groups(parts, torch.device("cpu"), HK, HQ // HK)[0] if short else []

    def batched() -> None:
        for group in groups:
            group.attend(q, cache, D ** -0.5, out)

    def sdpa() -> None:
        for p in parts:
            k, v = cache.index_select(1, p.kv_index).split(HK)
            o = F.scaled_dot_product_attention(q[p.start:p.end].transpose(0, 1).unsqueeze(0), k.unsqueeze(0),
                                               v.unsqueeze(0), attn_mask=mask, scale=D ** -0.5, enable_gqa=True)
            out[p.start:p.end] = o[0].transpose(0, 1)

    forms = {"native": native, "sdpa": sdpa}
    if groups:
        forms["batched"] = batched
    best = {name: float("inf") for name in forms}
    for _ in range(repeats):
        for name, fn in forms.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if native_chunks.path() is None:
        raise SystemExit("the native chunk kernel is unavailable here")
    print(f"# bench/chunk_attention.py  {time.strftime('%Y-%m-%d')}  {machine()}  kernel path={native_chunks.path()}")
    print(f"{'chunks':>6} {'tokens':>6} {'context':>7} {'native ms':>10} {'batched ms':>11} {'sdpa ms':>9} "
          f"{'sdpa/native':>12}")
    for chunks, n, ctx in CASES:
        r = case(chunks, n, ctx, args.repeats)
        batched = f"{r['batched'] * 1e3:11.2f}" if "batched" in r else f"{'-':>11}"
        print(f"{chunks:6d} {n:6d} {ctx:7d} {r['native'] * 1e3:10.2f} {batched} {r['sdpa'] * 1e3:9.2f} "
              f"{r['sdpa'] / r['native']:12.2f}", flush=True)


if __name__ == "__main__":
    main()
