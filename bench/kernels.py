"""Timings of the CPU LoRA paths on SmolLM-135M-sized projection groups.

Prints, per scenario, the time of `add_lora` as the engine runs it on the CPU (the native kernel
for segments up to 64 tokens, matmuls for longer ones), of the torch reference `add_lora_ref`
(fused) and of its shrink+expand, beside the dense base matmul of the same group, so the LoRA
overhead can be read as a fraction of the base projection.
Usage: python -m bench.kernels [--threads N] [--dtype float32|bfloat16]
"""
from __future__ import annotations

import argparse
import time

import torch

from bench.common import machine
from loragate.kernels import LoraBatchLayout, add_lora, add_lora_ref, lora_expand_ref, lora_shrink_ref
from loragate.kernels.lora_cpu import use_native

GROUPS = {  # name: (in_dim, slice widths), SmolLM-135M: hidden 576, 9 heads x 64, 3 kv heads
    "qkv": (576, (576, 192, 192)),
    "gate_up": (576, (1536, 1536)),
    "down": (1536, (576,)),
}
SCENARIOS = {  # name: token slots (-1 = base model)
    "decode 32 seqs / 8 adapters": sorted(i % 8 for i in range(32)),  # the engine sorts by slot
    "decode 32 seqs / 32 segments": [i % 8 for i in range(32)],  # worst case: unsorted
    "decode 32 seqs / 1 adapter": [0] * 32,
    "prefill 512 / 2 adapters + base": [0] * 200 + [-1] * 112 + [1] * 200,
}


def timeit(fn, reps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    slots, rank = 8, args.rank
    print(f"# bench/kernels.py  {time.strftime('%Y-%m-%d')}  {machine()}")
    print(f"threads={args.threads} dtype={args.dtype} rank={rank}")
    print(f"{'scenario':34s} {'group':8s} {'base ms':>8s} {'engine ms':>10s} {'fused ms':>9s} {'split ms':>9s}")
    for scen, token_slots in SCENARIOS.items():
        layout = LoraBatchLayout.from_token_slots(token_slots, [rank] * slots, [2.0] * slots)
        T = len(token_slots)
        for gname, (in_dim, widths) in GROUPS.items():
            offs = [0]
            for w in widths:
                offs.append(offs[-1] + w)
            A = torch.randn(slots, len(widths), rank, in_dim, dtype=dtype)
            # the engine's CPU layout: B rank-major ([slots, R, N] underneath)
            B = torch.randn(slots, rank, offs[-1], dtype=dtype).transpose(1, 2)
            W = torch.randn(offs[-1], in_dim, dtype=dtype)
            x = torch.randn(T, in_dim, dtype=dtype)
            y = torch.zeros(T, offs[-1], dtype=dtype)
            base = timeit(lambda: torch.mm(x, W.t()), args.reps)
            engine = timeit(lambda: add_lora(y, x, A, B, offs, layout), args.reps)
            fused = timeit(lambda: add_lora_ref(y, x, A, B, offs, layout), args.reps)
            split = timeit(lambda: lora_expand_ref(y, lora_shrink_ref(x, A, layout), B, offs, layout), args.reps)
            mark = "" if use_native(y, A, B) else " (torch)"
            print(f"{scen:34s} {gname:8s} {base:8.3f} {engine:10.3f} {fused:9.3f} {split:9.3f}{mark}")


if __name__ == "__main__":
    main()
