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
With --plot, (a) is also measured on HF PEFT (one PeftModel, adapters loaded up to each count in
turn, the request on a random one of them, --peft-samples each) and drawn beside ours, latency
against adapters registered (PNG, default docs/adapters.png). PEFT stops at --peft-max-count
(default 100): each `load_adapter` walks every adapter already loaded, so registering grows
quadratically (measured: 0.4 s for the 2nd, 2 s for the 40th, 4 s around the 100th on the 2-core
VM; extrapolated, the 1000th would take about a minute and all thousand several hours).

    python -m bench.adapters [--counts 1 10 100 1000] [--spreads 1 10 100] [--rounds 3] [--skip-peft]
                             [--plot [docs/adapters.png]]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
import uuid
from pathlib import Path

import torch

from bench.common import (
    CACHE,
    machine,
    save_figure,
    smollm_checkpoint,
    write_random_adapters,
)
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
            kw = {"max_new_tokens": NEW_TPUT, "min_new_tokens": NEW_TPUT, "do_sample": False, "pad_token_id": 0,
                      "eos_token_id": None}
            if names:
                kw["adapter_names"] = [names[i % len(names)] for i in idx]
            out = model.generate(x, **kw)
            tokens += (out.shape[1] - PROMPT) * out.shape[0]
    return tokens / (time.perf_counter() - t)


def peft_latency(base, adapters: list, counts: list[int], samples: int, dtype: torch.dtype) -> dict[int, float]:
    """Median seconds of the (a) request on HF PEFT with `n` adapters loaded, for each n of
    `counts`: one PeftModel, adapters added up to each count in turn, the request on a random
    loaded adapter each sample."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype).eval()
    model = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name=adapters[0].name)
    loaded, out = 1, {}
    vocab = model.config.vocab_size
    rng = random.Random(0)
    kw = {"max_new_tokens": NEW_LAT, "min_new_tokens": NEW_LAT, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    for n in sorted(counts):
        t = time.perf_counter()
        for p in adapters[loaded:n]:
            model.load_adapter(str(p), adapter_name=p.name)
        if n > loaded:
            print(f"  (PEFT: loaded adapters {loaded + 1}..{n} in {time.perf_counter() - t:.0f} s)", flush=True)
        loaded = max(loaded, n)
        times = []
        with torch.inference_mode():
            for i in range(samples + 1):  # the first one warms up
                model.set_adapter(adapters[rng.randrange(n)].name)
                x = torch.tensor([prompt(vocab, i)])
                t = time.perf_counter()
                model.generate(x, **kw)
                if i:
                    times.append(time.perf_counter() - t)
        out[n] = statistics.median(times)
    return out


def plot_latency(ours_warm: dict[int, float], ours_cold: dict[int, float], peft: dict[int, float] | None,
                 path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs = sorted(ours_warm)
    ax.plot(xs, [ours_warm[n] * 1e3 for n in xs], marker="o", label="loragate (adapter resident)")
    ax.plot(xs, [ours_cold[n] * 1e3 for n in xs], marker=".", ls="--", alpha=0.7,
            label="loragate, first use (loaded from disk)")
    if peft:
        px = sorted(peft)
        more = " (registering more takes hours)" if max(px) < max(xs) else ""
        ax.plot(px, [peft[n] * 1e3 for n in px], marker="s", label=f"HF PEFT (set_adapter + generate){more}")
    ax.set_xscale("log")
    ax.set_xticks(xs, [str(n) for n in xs])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_ylim(bottom=0)
    ax.set_xlabel("adapters registered")
    ax.set_ylabel(f"latency (ms): {PROMPT}-token prompt + {NEW_LAT} new tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=8)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 10, 100, 1000])
    ap.add_argument("--spreads", type=int, nargs="+", default=[1, 10, 100])
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--plot", nargs="?", const="docs/adapters.png",
                    help="also time (a) on HF PEFT and draw both (PNG; default docs/adapters.png)")
    ap.add_argument("--peft-samples", type=int, default=5, help="(a) on PEFT: requests per adapter count")
    ap.add_argument("--peft-max-count", type=int, default=100,
                    help="(a) on PEFT: adapter counts up to this (PEFT registers adapters in quadratic time)")
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
    warm_ms, cold_ms = {}, {}
    for n in counts:
        engines[n].shutdown()
        # with one adapter only the very first request is cold
        colds = [lat[n][0][0]] if n == 1 else [c for c, _ in lat[n]]
        warms = [w for _, w in lat[n]]
        warm_ms[n], cold_ms[n] = statistics.median(warms), statistics.median(colds)
        ratio = statistics.median(w / w1 for (_, w), (_, w1) in zip(lat[n], lat[counts[0]]))
        print(f"{n:8d} {statistics.median(colds) * 1e3:8.1f} {statistics.median(warms) * 1e3:8.1f} {ratio:17.2f}",
              flush=True)
    engines.clear()
    if args.plot and counts:
        peft_lat = None
        if not args.skip_peft:
            print(f"(a) on HF PEFT, {args.peft_samples} requests per count:")
            peft_counts = [n for n in counts if n <= args.peft_max_count]
            peft_lat = peft_latency(base, adapters, peft_counts, args.peft_samples, getattr(torch, args.dtype))
            for n, v in peft_lat.items():
                print(f"{n:8d} {'':8} {v * 1e3:8.1f}   PEFT; loragate / PEFT {warm_ms[n] / v:.2f}", flush=True)
        plot_latency(warm_ms, cold_ms, peft_lat, Path(args.plot),
                     f"SmolLM-135M-shaped model, {args.dtype}, rank-{args.rank} adapters on "
                     f"{','.join(args.targets)}, one request at a time\n{machine()}")

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
