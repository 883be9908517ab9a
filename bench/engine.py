"""Decode throughput of the engine vs HF transformers' generate vs the matmul floor.

One run, one machine, random SmolLM-135M-shaped checkpoint (hidden 576, 30 layers, 9 heads,
3 KV heads, intermediate 1536, vocab 49152), bf16 by default. For each batch size B:
  ours     - B requests prefilled, then the time of N decode steps of the engine
  hf       - transformers' generate on the same B prompts (greedy), prefill time subtracted
  floor    - the same model's matmuls alone (qkv, o, gate_up, down per layer + lm_head) at batch B,
             run the way the engine runs them (on the CPU: weights reordered once for oneDNN)
  plain    - the same matmuls as F.linear on row-major weights (how HF runs them), for reference
Each is measured --rounds times, interleaved; times are medians over the rounds, and the ratios
are medians of the per-round ratios (each round measures ours, the floor and HF back to back, so
the drift of a shared VM's speed between rounds cancels out of them; the per-round ratios are
printed too). Prints tokens/s and the ratios the issue names: step / floor at B=32, ours / hf
at B=8.

    python bench/engine.py [--batches 1 8 32 64] [--steps 24] [--rounds 5] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
import uuid

import torch
import torch.nn.functional as F

from bench.common import machine, smollm_checkpoint, timeit
from loragate.engine.config import EngineConfig
from loragate.engine.engine import Engine
from loragate.engine.outputs import EngineRequest
from loragate.engine.sampling_params import SamplingParams

PROMPT_LEN = 32


def prompts(batch: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(10, vocab, (batch, PROMPT_LEN), generator=g).tolist()


def bench_ours(engine: Engine, batch: int, steps: int) -> float:
    """Seconds per decode step at batch `batch` (all sequences decoding)."""
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    ids = []
    for p in prompts(batch, engine.model_config.vocab_size):
        rid = uuid.uuid4().hex
        ids.append(rid)
        engine.add_request(EngineRequest(rid, p, params))
    while any(engine.seqs[r].num_computed < len(engine.seqs[r].prompt_ids) for r in ids):
        engine.step()
    engine.step()  # first decode step (warm-up of the decode path)
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    dt = (time.perf_counter() - t) / steps
    for r in ids:
        engine.abort(r)
    return dt


def load_hf(path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def bench_hf(model, batch: int, steps: int) -> float:
    """Seconds per decode step of transformers' generate (greedy), its prefill subtracted."""
    x = torch.tensor(prompts(batch, model.config.vocab_size))
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model.generate(x, max_new_tokens=2, min_new_tokens=2, **kw)
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
        t_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=steps + 1, min_new_tokens=steps + 1, **kw)
        t_all = time.perf_counter() - t0
    return (t_all - t_prefill) / steps


@functools.lru_cache(maxsize=1)
def row_major_weights(engine: Engine) -> list[torch.Tensor]:
    """Random row-major weights of the engine's projection shapes (the packed ones cannot be fed to
    F.linear), made once per run rather than once per measurement."""
    return [torch.randn(lin.out_features, lin.in_features, dtype=engine.dtype, device=engine.device)
            for lin in engine.model.linears()]


def bench_floor(engine: Engine, batch: int, plain: bool = False) -> float:
    """Seconds for one decode step's matmuls alone: the engine's own projections (as it lays their
    weights out) at `batch` rows, or with `plain`, F.linear on row-major weights as HF calls them."""
    linears = engine.model.linears()
    xs = {n: torch.randn(batch, n, dtype=engine.dtype, device=engine.device) for n in {lin.in_features for lin in linears}}
    if plain:
        ws = row_major_weights(engine)

        def step():
            for lin, w in zip(linears, ws):
                F.linear(xs[lin.in_features], w)
    else:
        def step():
            for lin in linears:
                lin(xs[lin.in_features])

    with torch.inference_mode():
        return timeit(step, iters=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=5,
                    help="measure ours / floor / plain / HF this many times, interleaved, and report medians "
                         "(a shared VM's speed drifts by tens of percent within minutes)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    path = smollm_checkpoint(args.dtype)
    dtype = getattr(torch, args.dtype)
    cfg = EngineConfig(model=str(path), dtype=args.dtype, device=args.device, max_num_seqs=max(args.batches),
                       max_num_batched_tokens=4096, kv_cache_memory=1 << 30, enable_lora=False)
    engine = Engine(cfg)
    hf_model = None if args.skip_hf else load_hf(path, dtype)
    print(f"# bench/engine.py  {time.strftime('%Y-%m-%d')}  {machine()}  dtype={args.dtype}  "
          f"threads={torch.get_num_threads()}  {args.rounds} interleaved rounds: times are medians, ratios medians of "
          "the per-round ratios")
    print(f"{'batch':>5} {'ours tok/s':>11} {'hf tok/s':>10} {'floor tok/s':>12} {'step ms':>8} {'floor ms':>9} "
          f"{'plain ms':>9} {'step/floor':>10} {'ours/hf':>8}  per-round step/floor, ours/hf")
    rows = []
    for b in args.batches:
        runs: dict[str, list[float]] = {"ours": [], "floor": [], "plain": [], "hf": []}
        for _ in range(args.rounds):
            runs["ours"].append(bench_ours(engine, b, args.steps))
            runs["floor"].append(bench_floor(engine, b))
            runs["plain"].append(bench_floor(engine, b, plain=True))
            if hf_model is not None:
                runs["hf"].append(bench_hf(hf_model, b, args.steps))
        med = {k: statistics.median(v) if v else None for k, v in runs.items()}
        ours, floor, plain, hf = med["ours"], med["floor"], med["plain"], med["hf"]
        step_over_floor = statistics.median(o / f for o, f in zip(runs["ours"], runs["floor"]))
        ours_over_hf = statistics.median(h / o for o, h in zip(runs["ours"], runs["hf"])) if hf else None
        row = dict(batch=b, ours_tok_s=b / ours, hf_tok_s=(b / hf) if hf else None, floor_tok_s=b / floor,
                   step_ms=ours * 1e3, floor_ms=floor * 1e3, plain_floor_ms=plain * 1e3,
                   step_over_floor=step_over_floor, ours_over_hf=ours_over_hf, rounds={k: [x * 1e3 for x in v] for k, v in runs.items()})
        rows.append(row)
        hf_s = f"{row['hf_tok_s']:10.1f}" if hf else f"{'-':>10}"
        ratio = f"{row['ours_over_hf']:8.2f}" if hf else f"{'-':>8}"
        per_round = " ".join(f"{o / f:.2f}" for o, f in zip(runs["ours"], runs["floor"]))
        if runs["hf"]:
            per_round += ", " + " ".join(f"{h / o:.2f}" for o, h in zip(runs["ours"], runs["hf"]))
        print(f"{b:5d} {row['ours_tok_s']:11.1f} {hf_s} {row['floor_tok_s']:12.1f} {row['step_ms']:8.2f} "
              f"{row['floor_ms']:9.2f} {row['plain_floor_ms']:9.2f} {row['step_over_floor']:10.2f} {ratio}  {per_round}",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine(), dtype=args.dtype, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
