"""Multi-adapter serving: latency vs number of adapters, throughput vs adapter spread, vs HF PEFT.

One run, one machine, random SmolLM-135M-shaped base (bf16, CPU by default) and random PEFT
adapters (rank 8 on q_proj/v_proj — PEFT's default targets for Llama — unless flags say otherwise).
  (a) latency of a 70-token prompt + 10 new tokens, one request at a time, adapter picked at random,
      with 1, 100 and 1000 adapters registered; cold (first use: loaded from disk) and warm apart.
  (b) throughput of 32 concurrent streams (96 requests, 64 new tokens each) spread over 1, 10 and
      100 adapters, and the same load on the base model.
  (c) the same (b) workloads on HF PEFT (mixed-adapter batches via generate(adapter_names=...)).
(a) alternates the adapter counts request by request (--samples x --rounds samples each); (b) runs
base and every spread --rounds times, interleaved; both report medians; PEFT runs once.

    python bench/adapters.py [--counts 1 100 1000] [--spreads 1 10 100] [--rounds 3] [--skip-peft]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
import uuid

import torch

from bench.common import CACHE, machine, smollm_checkpoint, write_random_adapters
from loragate.engine.config import EngineConfig
from loragate.engine.engine import Engine
from loragate.engine.outputs import EngineRequest
from loragate.engine.sampling_params import SamplingParams

PROMPT = 70
NEW_LAT = 10
NEW_TPUT = 64
STREAMS = 32
REQUESTS = 96


def prompt(vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (PROMPT,), generator=g).tolist()


def make_engine(base, adapters: list, max_loras: int, dtype: str, device: str = "auto") -> Engine:
    cfg = EngineConfig(model=str(base), dtype=dtype, device=device, adapters=tuple((p.name, str(p)) for p in adapters),
                       max_loras=max_loras, max_lora_rank=16, max_num_seqs=STREAMS,
                       max_num_batched_tokens=2048, kv_cache_memory=1 << 30,
                       enable_prefix_caching=False)  # prompts repeat across samples and rounds: time their prefill
    engine = Engine(cfg)
    engine.start()
    return engine


def run_one(engine: Engine, req: EngineRequest) -> float:
    t = time.perf_counter()
    engine.add_request(req)
    while engine.has_work():
        outs = engine.step()
        if not outs and not engine.scheduler.running:
            time.sleep(0.0005)  # adapter still loading on its own thread: leave it the GIL
        for out in outs:
            if out.finished and out.finish_reason not in ("length", "stop"):
                raise RuntimeError(out.error or out.finish_reason)
    return time.perf_counter() - t


def cold_and_warm(engine: Engine, name: str, i: int) -> tuple[float, float]:
    """Seconds of two identical requests on adapter `name`, back to back: the first loads it
    (unless it is resident already), the second finds it in its slot."""
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=NEW_LAT, temperature=0.0, ignore_eos=True)
    first, second = (run_one(engine, EngineRequest(uuid.uuid4().hex, prompt(vocab, i), params, adapter=name))
                     for _ in range(2))
    return first, second


def throughput(engine: Engine, names: list[str | None]) -> float:
    """Generated tokens/s for REQUESTS requests at STREAMS concurrency, adapters round-robin."""
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=NEW_TPUT, temperature=0.0, ignore_eos=True)
    reqs = [EngineRequest(uuid.uuid4().hex, prompt(vocab, 1000 + i), params, adapter=names[i % len(names)])
            for i in range(REQUESTS)]
    todo = list(reqs)
    live = 0
    tokens = 0
    t = time.perf_counter()
    while todo or live:
        while todo and live < STREAMS:
            engine.add_request(todo.pop(0))
            live += 1
        outs = engine.step()
        if not outs and not engine.scheduler.running:
            time.sleep(0.0005)
        for out in outs:
            tokens += len(out.new_token_ids)
            live -= out.finished
    return tokens / (time.perf_counter() - t)


def peft_throughput(base, adapters: list, spread: int, dtype: torch.dtype) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype).eval()
    names: list[str] = []
    if spread:
        model = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name=adapters[0].name)
        for p in adapters[1:spread]:
            model.load_adapter(str(p), adapter_name=p.name)
        names = [p.name for p in adapters[:spread]]
    vocab = model.config.vocab_size
    tokens = 0
    t = time.perf_counter()
    with torch.inference_mode():
        for wave in range(REQUESTS // STREAMS):
            idx = range(wave * STREAMS, (wave + 1) * STREAMS)
            x = torch.tensor([prompt(vocab, 1000 + i) for i in idx])
            kw = dict(max_new_tokens=NEW_TPUT, min_new_tokens=NEW_TPUT, do_sample=False, pad_token_id=0,
                      eos_token_id=None)
            if names:
                kw["adapter_names"] = [names[i % len(names)] for i in idx]
            out = model.generate(x, **kw)
            tokens += (out.shape[1] - PROMPT) * out.shape[0]
    return tokens / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 100, 1000])
    ap.add_argument("--spreads", type=int, nargs="+", default=[1, 10, 100])
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--skip-latency", action="store_true", help="run only (b) and (c)")
    ap.add_argument("--skip-throughput", action="store_true", help="run only (a)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="(b): run base and every spread this many times, interleaved, and report medians "
                         "(a shared VM's speed drifts by tens of percent within minutes)")
    args = ap.parse_args()
    base = smollm_checkpoint(args.dtype)
    n_all = max(max(args.counts), max(args.spreads))
    t = time.perf_counter()
    adapters = write_random_adapters(base, CACHE / f"adapters-r{args.rank}-{'-'.join(args.targets)}", n_all,
                                     rank=args.rank, targets=tuple(args.targets), dtype=args.dtype)
    print(f"# bench/adapters.py  {time.strftime('%Y-%m-%d')}  {machine()}  dtype={args.dtype}  "
          f"adapters: rank {args.rank} on {','.join(args.targets)}  (wrote/checked {n_all} in {time.perf_counter() - t:.1f}s)")

    print(f"\n(a) latency, 70-token prompt + 10 new tokens, one request at a time; the adapter counts take "
          f"turns sample by sample ({args.samples * args.rounds} samples); warm / 1-adapter is the median of the "
          "per-sample ratios")
    print(f"{'adapters':>8} {'cold ms':>8} {'warm ms':>8} {'warm / 1-adapter':>17}")
    counts = [] if args.skip_latency else args.counts
    engines = {n: make_engine(base, adapters[:n], max_loras=16, dtype=args.dtype, device=args.device) for n in counts}
    total = args.samples * args.rounds
    picks = {n: (random.Random(n).sample([p.name for p in adapters[:n]], min(total, n)) * total)[:total]
             for n in counts}
    lat: dict[int, list[tuple[float, float]]] = {n: [] for n in counts}
    for i in range(total):  # alternating counts request by request: the VM's drift hits them alike
        for n in counts:
            lat[n].append(cold_and_warm(engines[n], picks[n][i], i))
    for n in counts:
        engines[n].shutdown()
        # with one adapter only the very first request is cold
        colds = [lat[n][0][0]] if n == 1 else [c for c, _ in lat[n]]
        warms = [w for _, w in lat[n]]
        ratio = statistics.median(w / w1 for (_, w), (_, w1) in zip(lat[n], lat[counts[0]]))
        print(f"{n:8d} {statistics.median(colds) * 1e3:8.1f} {statistics.median(warms) * 1e3:8.1f} {ratio:17.2f}",
              flush=True)

    if args.skip_throughput:
        return
    print(f"\n(b) throughput, {STREAMS} concurrent streams, {REQUESTS} requests x {NEW_TPUT} new tokens "
          f"(ours: median of {args.rounds} interleaved rounds; PEFT: one run)")
    print(f"{'spread':>8} {'ours tok/s':>11} {'vs base':>8} {'peft tok/s':>11} {'ours/peft':>10}  per-round vs base")
    engine = make_engine(base, adapters[: max(args.spreads)], max_loras=STREAMS, dtype=args.dtype, device=args.device)
    workloads: list[tuple[str, list[str | None]]] = [("base", [None])]
    workloads += [(str(k), [p.name for p in adapters[:k]]) for k in args.spreads]
    runs: dict[str, list[float]] = {name: [] for name, _ in workloads}
    for _ in range(args.rounds):
        for name, names in workloads:
            runs[name].append(throughput(engine, names))
    engine.shutdown()
    base_tput = statistics.median(runs["base"])
    peft_base = None if args.skip_peft else peft_throughput(base, adapters, 0, getattr(torch, args.dtype))
    for name, _ in workloads:
        tput = statistics.median(runs[name])
        spread = 0 if name == "base" else int(name)
        peft = peft_base if spread == 0 else (None if args.skip_peft else
                                              peft_throughput(base, adapters, spread, getattr(torch, args.dtype)))
        pb = f"{peft:11.1f}" if peft else f"{'-':>11}"
        pr = f"{tput / peft:10.2f}" if peft else f"{'-':>10}"
        per_round = " ".join(f"{x / b:.2f}" for x, b in zip(runs[name], runs["base"]))
        print(f"{name:>8} {tput:11.1f} {tput / base_tput:8.2f} {pb} {pr}  {per_round}", flush=True)


if __name__ == "__main__":
    main()
