"""What the native CPU kernels buy in the engine's decode step: native vs torch ops, step by step.

One engine, one batch of B decoding sequences; consecutive steps alternate between
LORAGATE_CPU_KERNELS=native and =torch (the variable is read on every call), so both variants run
on the same sequences, the same cache and the same minute of this VM's drifting speed. Prints the
median step time of each and their ratio, per batch size. (Comparing two separate runs would
measure the VM's drift as much as the kernels.)

    python -m bench.cpu_kernels [--batches 1 8 32 64] [--steps 40] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid

import torch

from bench.common import machine, smollm_checkpoint
from bench.engine import prompts
from loragate.engine.config import EngineConfig
from loragate.engine.engine import Engine
from loragate.engine.outputs import EngineRequest
from loragate.engine.sampling_params import SamplingParams
from loragate.kernels import native

VARIANTS = ("native", "torch")


def alternate(engine: Engine, batch: int, steps: int) -> dict[str, float]:
    """Median seconds per decode step of each variant, the variants taking turns step by step."""
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    ids = []
    for p in prompts(batch, engine.model_config.vocab_size):
        ids.append(uuid.uuid4().hex)
        engine.add_request(EngineRequest(ids[-1], p, params))
    while any(engine.seqs[r].num_computed < len(engine.seqs[r].prompt_ids) for r in ids):
        engine.step()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    try:
        for i in range(steps + 2 * len(VARIANTS)):
            variant = VARIANTS[i % len(VARIANTS)]
            os.environ[native.BACKEND_ENV] = variant
            t = time.perf_counter()
            engine.step()
            if i >= 2 * len(VARIANTS):  # the first step of each variant warms it up
                times[variant].append(time.perf_counter() - t)
    finally:
        os.environ.pop(native.BACKEND_ENV, None)
        for r in ids:
            engine.abort(r)
    return {v: statistics.median(ts) for v, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--steps", type=int, default=40, help="timed steps per batch, both variants together")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    builds = native.load_all()
    missing = {name: b.error for name, b in builds.items() if b.library is None}
    if missing:
        raise SystemExit(f"native kernels unavailable here: {missing}")
    path = smollm_checkpoint(args.dtype)
    cfg = EngineConfig(model=str(path), dtype=args.dtype, device="cpu", max_num_seqs=max(args.batches),
                       max_num_batched_tokens=4096, kv_cache_memory=1 << 30, enable_lora=False)
    engine = Engine(cfg)
    print(f"# bench/cpu_kernels.py  {time.strftime('%Y-%m-%d')}  {machine()}  dtype={args.dtype}  "
          f"threads={torch.get_num_threads()}  steps alternate native/torch; medians")
    print(f"{'batch':>5} {'native ms':>10} {'torch ms':>9} {'torch/native':>13}")
    for b in args.batches:
        t = alternate(engine, b, args.steps)
        print(f"{b:5d} {t['native'] * 1e3:10.2f} {t['torch'] * 1e3:9.2f} {t['torch'] / t['native']:13.2f}", flush=True)


if __name__ == "__main__":
    main()
