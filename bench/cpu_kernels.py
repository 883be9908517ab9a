"""What the native CPU kernels buy in the engine's decode step: native vs torch ops, step by step.

One engine, one batch of B decoding sequences; consecutive steps alternate between
LORAGATE_CPU_KERNELS=native and =torch (the variable is read on every call), so both variants run
on the same sequences, the same cache and the same minute of this VM's drifting speed. Prints the
median step time of each and their ratio, per batch size. (Comparing two separate runs would
measure the VM's drift as much as the kernels.) `--isas native avx2 portable` alternates the
native kernels' build paths too (LORAGATE_CPU_ISA, also read on every call): the AVX2 and portable
paths timed beside the host's own, each ratio against torch.

    python -m bench.cpu_kernels [--batches 1 8 32 64] [--steps 40] [--dtype bfloat16] [--isas native avx2]
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


def alternate(engine: Engine, batch: int, steps: int, variants: tuple[str, ...]) -> dict[str, float]:
    """Median seconds per decode step of each variant ("torch", or a native build target), the
    variants taking turns step by step."""
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    ids = []
    for p in prompts(batch, engine.model_config.vocab_size):
        ids.append(uuid.uuid4().hex)
        engine.add_request(EngineRequest(ids[-1], p, params))
    while any(engine.seqs[r].num_computed < len(engine.seqs[r].prompt_ids) for r in ids):
        engine.step()
    times: dict[str, list[float]] = {v: [] for v in variants}
    try:
        for i in range(steps + 2 * len(variants)):
            variant = variants[i % len(variants)]
            os.environ[native.BACKEND_ENV] = "torch" if variant == "torch" else "native"
            os.environ[native.ISA_ENV] = "native" if variant == "torch" else variant
            t = time.perf_counter()
            engine.step()
            if i >= 2 * len(variants):  # the first step of each variant warms it up
                times[variant].append(time.perf_counter() - t)
    finally:
        os.environ.pop(native.BACKEND_ENV, None)
        os.environ.pop(native.ISA_ENV, None)
        for r in ids:
            engine.abort(r)
    return {v: statistics.median(ts) for v, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--steps", type=int, default=40, help="timed steps per batch, both variants together")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--isas", nargs="+", default=["native"], choices=list(native.TARGET_FLAGS),
                    help="native build targets to alternate with torch (LORAGATE_CPU_ISA)")
    args = ap.parse_args()
    paths = {}
    for isa in args.isas:
        builds = native.load_all(isa)
        missing = {name: b.error for name, b in builds.items() if b.library is None}
        if missing:
            raise SystemExit(f"native kernels ({isa}) unavailable here: {missing}")
        paths[isa] = next(iter(builds.values())).isa
    variants = (*args.isas, "torch")
    path = smollm_checkpoint(args.dtype)
    cfg = EngineConfig(model=str(path), dtype=args.dtype, device="cpu", max_num_seqs=max(args.batches),
                       max_num_batched_tokens=4096, kv_cache_memory=1 << 30, enable_lora=False)
    engine = Engine(cfg)
    print(f"# bench/cpu_kernels.py  {time.strftime('%Y-%m-%d')}  {machine()}  dtype={args.dtype}  "
          f"threads={torch.get_num_threads()}  steps alternate {' / '.join(variants)}; medians")
    names = [f"{isa}={paths[isa]}" for isa in args.isas]
    print(f"{'batch':>5} " + " ".join(f"{n + ' ms':>16}" for n in names) + f" {'torch ms':>9} "
          + " ".join(f"{'torch/' + isa:>16}" for isa in args.isas))
    for b in args.batches:
        t = alternate(engine, b, args.steps, variants)
        print(f"{b:5d} " + " ".join(f"{t[isa] * 1e3:16.2f}" for isa in args.isas) + f" {t['torch'] * 1e3:9.2f} "
              + " ".join(f"{t['torch'] / t[isa]:16.2f}" for isa in args.isas), flush=True)


if __name__ == "__main__":
    main()
