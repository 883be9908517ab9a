"""Where the native CPU LoRA kernel stops beating the matmul form, per segment: the data behind
`loragate.kernels.lora.NATIVE_MAX_WORK`.

For each (input width, rank) and segment length, the same q|k|v-shaped LoRA delta of several
segments is added by the native kernel (a token's dot products, no reuse across tokens, no per-call
cost) and by the matmul form (`lora_ref.add_lora_segment`: two matmuls' worth of calls a segment),
taking turns; best of --repeats. Prints both times, which wins, and the segment's work (tokens x
input width x rank) that the dispatch rule compares with NATIVE_MAX_WORK.

    python -m bench.lora_segments [--dtype bfloat16] [--repeats 5]
"""
from __future__ import annotations

import argparse
import time

import torch

from bench.common import machine
from loragate.kernels import lora as lora_dispatch
from loragate.kernels import lora_cpu, native
from loragate.kernels.layout import LoraBatchLayout, Segment
from loragate.kernels.lora_ref import add_lora_segment

SHAPES = ((576, 8), (576, 64), (2048, 8), (2048, 64), (4096, 8), (4096, 64))  # (input width, rank)
LENGTHS = ((8, 32), (16, 32), (32, 16), (48, 10), (96, 10), (160, 4))  # (tokens a segment, segments)


def measure(in_dim: int, rank: int, length: int, segments: int, dtype: torch.dtype,
            repeats: int) -> tuple[float, float]:
    """(native, matmul) best seconds to add the delta of `segments` segments of `length` tokens."""
    g = torch.Generator().manual_seed(0)
    outs = (in_dim, in_dim // 4, in_dim // 4)  # q, k, v of a 4:1 GQA model
    offsets = [0]
    for o in outs:
        offsets.append(offsets[-1] + o)
    slots = 4
    A = (0.02 * torch.randn(slots, len(outs), rank, in_dim, generator=g)).to(dtype)
    B = (0.02 * torch.randn(slots, rank, offsets[-1], generator=g)).to(dtype).transpose(1, 2)  # rank-major
    T = length * segments
    x = torch.randn(T, in_dim, generator=g).to(dtype)
    y = torch.zeros(T, offsets[-1], dtype=dtype)
    segs = [Segment(i * length, length, i % slots, rank, 2.0) for i in range(segments)]
    layout = LoraBatchLayout.from_segments(T, segs)
    active = tuple(range(len(outs)))

    def run_native() -> None:
        lora_cpu.add_lora_native(y, x, A, B, offsets, layout, active, length)

    def run_matmul() -> None:
        for s in segs:
            add_lora_segment(y, x, A, B, offsets, s, active)

    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, fn in enumerate((run_native, run_matmul)):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best[0], best[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    if native.load(lora_cpu.LIBRARY).library is None:
        raise SystemExit(f"the native LoRA kernel is unavailable: {native.load(lora_cpu.LIBRARY).error}")
    print(f"# bench/lora_segments.py  {time.strftime('%Y-%m-%d')}  {machine()}  dtype={args.dtype}  "
          f"NATIVE_MAX_WORK={lora_dispatch.NATIVE_MAX_WORK}")
    print(f"{'in':>5} {'rank':>4} {'tokens':>6} {'segs':>4} {'native ms':>10} {'matmul ms':>10} {'faster':>7} "
          f"{'work':>9} {'dispatch':>8}")
    for in_dim, rank in SHAPES:
        for length, segments in LENGTHS:
            nat, mm = measure(in_dim, rank, length, segments, dtype, args.repeats)
            work = length * in_dim * rank
            chosen = "native" if length <= lora_dispatch.native_max_len(in_dim, rank) else "matmul"
            print(f"{in_dim:5d} {rank:4d} {length:6d} {segments:4d} {nat * 1e3:10.3f} {mm * 1e3:10.3f} "
                  f"{'native' if nat < mm else 'matmul':>7} {work:9d} {chosen:>8}", flush=True)


if __name__ == "__main__":
    main()
