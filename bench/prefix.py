"""Prefix caching: time to first token and throughput with caching on vs off, in one run.

One machine, random SmolLM-135M-shaped base (bf16, CPU by default) and random PEFT adapters (rank
8 on q_proj/v_proj). Two engines, identical but for `enable_prefix_caching`, run the same workloads:
  (a) shared prefix: --streams closed-loop streams (each sends its next request when the last one
      finishes, --requests in all) over --adapters adapters; stream i uses adapter i % adapters and
      that adapter's own --system-len-token system prompt, plus a fresh --user-len-token user turn,
      --new-tokens new tokens. Each adapter has served one request with its system prompt before
      the clock starts (--cold: not), as in steady state, where a customer's assistant sends the
      same system prompt all day. Reported: TTFT p50 (arrival -> first token), output tokens/s and
      the share of prompt tokens found cached.
  (b) no shared prefix: the same streams with random --random-len-token prompts on the base model,
      where the cache can only cost: output tokens/s.
Each workload runs --rounds times, the two engines taking turns (a shared VM's speed drifts by
tens of percent within minutes); every round has its own prompts, so no round finds the previous
one's blocks. Ratios are medians of the per-round ratios. Throughput is also given per second of
this process's CPU time ("cpu"), which other load on a shared host disturbs far less than the wall
clock.

    python bench/prefix.py [--streams 32] [--adapters 10] [--requests 64] [--system-len 1000]
                           [--user-len 20] [--new-tokens 32] [--random-len 256] [--rounds 1]
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time
import uuid

import torch

from bench.common import CACHE, machine, smollm_checkpoint, write_random_adapters
from loragate.engine.config import EngineConfig
from loragate.engine.engine import Engine
from loragate.engine.outputs import EngineRequest
from loragate.engine.sampling_params import SamplingParams


def make_engine(base, adapters: list, caching: bool, args) -> Engine:
    cfg = EngineConfig(model=str(base), dtype=args.dtype, device=args.device,
                       adapters=tuple((p.name, str(p)) for p in adapters), max_loras=max(len(adapters), 1),
                       max_lora_rank=16, max_num_seqs=max(args.streams, 1),
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       kv_cache_memory=args.kv_cache_memory << 20, enable_prefix_caching=caching)
    engine = Engine(cfg)
    engine.start()
    # every adapter resident before the clock starts: this measures prefill, not disk loads
    params = SamplingParams(max_tokens=1, temperature=0.0)
    for p in adapters:
        engine.add_request(EngineRequest(uuid.uuid4().hex, [11, 12, 13], params, adapter=p.name))
    drain(engine)
    return engine


def drain(engine: Engine) -> None:
    while engine.has_work():
        if not engine.step() and not engine.scheduler.running:
            time.sleep(0.0005)  # an adapter is loading on its own thread: leave it the GIL


def ids(g: torch.Generator, vocab: int, n: int) -> list[int]:
    return torch.randint(10, vocab, (n,), generator=g).tolist()


def shared_workload(vocab: int, names: list[str], args, seed: int):
    """Per stream, its requests (prompt ids, adapter) in order; and one warm-up request per adapter."""
    g = torch.Generator().manual_seed(seed)
    systems = {name: ids(g, vocab, args.system_len) for name in names}
    streams: list[list[tuple[list[int], str | None]]] = [[] for _ in range(args.streams)]
    for k in range(args.requests):
        s = k % args.streams
        name = names[s % len(names)]
        streams[s].append((systems[name] + ids(g, vocab, args.user_len), name))
    warm = [[(systems[name] + ids(g, vocab, args.user_len), name)] for name in names]
    return streams, warm


def random_workload(vocab: int, args, seed: int) -> list[list[tuple[list[int], str | None]]]:
    g = torch.Generator().manual_seed(seed)
    streams: list[list[tuple[list[int], str | None]]] = [[] for _ in range(args.streams)]
    for k in range(args.requests):
        streams[k % args.streams].append((ids(g, vocab, args.random_len), None))
    return streams


def run(engine: Engine, streams, new_tokens: int) -> tuple[float, float, int, float]:
    """Closed-loop streams. Returns (TTFT p50 seconds, output tokens/s, prompt tokens cached,
    output tokens per CPU second of this process)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    todo = [collections.deque(s) for s in streams]
    live: dict[str, tuple[int, float]] = {}  # request id -> (stream, submitted at)
    ttft: list[float] = []
    tokens = cached = 0

    def submit(s: int) -> None:
        if todo[s]:
            prompt, name = todo[s].popleft()
            rid = uuid.uuid4().hex
            live[rid] = (s, time.perf_counter())
            engine.add_request(EngineRequest(rid, prompt, params, adapter=name))

    t0, c0 = time.perf_counter(), time.process_time()
    for s in range(len(todo)):
        submit(s)
    while live:
        outs = engine.step()
        now = time.perf_counter()
        if not outs and not engine.scheduler.running:
            time.sleep(0.0005)
        for out in outs:
            if out.finished and out.finish_reason not in ("length", "stop"):
                raise RuntimeError(out.error or out.finish_reason)
            s, submitted = live[out.request_id]
            if out.new_token_ids and out.completion_tokens == len(out.new_token_ids):
                ttft.append(now - submitted)
            tokens += len(out.new_token_ids)
            if out.finished:
                cached += out.cached_tokens
                del live[out.request_id]
                submit(s)
    return (statistics.median(ttft), tokens / (time.perf_counter() - t0), cached,
            tokens / (time.process_time() - c0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=10)
    ap.add_argument("--requests", type=int, default=64, help="requests per workload and round (all streams)")
    ap.add_argument("--system-len", type=int, default=1000)
    ap.add_argument("--user-len", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--random-len", type=int, default=256, help="prompt length of workload (b)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--kv-cache-memory", type=int, default=1024, help="MiB, per engine")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048, help="both engines' step token budget")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip-random", action="store_true", help="run only (a)")
    ap.add_argument("--skip-shared", action="store_true", help="run only (b)")
    ap.add_argument("--cold", action="store_true", help="(a) without the warm-up request per adapter")
    args = ap.parse_args()
    base = smollm_checkpoint(args.dtype)
    adapters = write_random_adapters(base, CACHE / "adapters-r8-q_proj-v_proj", args.adapters, rank=8,
                                     targets=("q_proj", "v_proj"), dtype=args.dtype)
    print(f"# bench/prefix.py  {time.strftime('%Y-%m-%d')}  {machine()}  dtype={args.dtype}  streams={args.streams} "
          f"requests={args.requests} adapters={args.adapters}  rounds={args.rounds}", flush=True)
    engines = {on: make_engine(base, adapters, on, args) for on in (False, True)}
    vocab = engines[True].model_config.vocab_size
    names = [p.name for p in adapters]

    print(f"\n(a) shared prefix: {args.system_len}-token system prompt per adapter + {args.user_len}-token user "
          f"turn, {args.new_tokens} new tokens, {'cold' if args.cold else 'each system prompt sent once before'}")
    print(f"{'round':>5} {'ttft p50 off':>13} {'ttft p50 on':>12} {'on/off':>7} {'tok/s off':>10} {'tok/s on':>9} "
          f"{'on/off':>7} {'cpu on/off':>11} {'cached':>8}")
    ttft_ratios, tput_ratios, cpu_ratios = [], [], []
    for r in range(0 if args.skip_shared else args.rounds):
        work, warm = shared_workload(vocab, names, args, seed=1000 + r)
        order = (False, True) if r % 2 == 0 else (True, False)  # a drifting VM favours neither
        if not args.cold:
            for mode in order:
                run(engines[mode], warm, 1)
        res = {mode: run(engines[mode], work, args.new_tokens) for mode in order}
        off, on = res[False], res[True]
        ttft_ratios.append(on[0] / off[0])
        tput_ratios.append(on[1] / off[1])
        cpu_ratios.append(on[3] / off[3])
        share = on[2] / sum(len(p) for s in work for p, _ in s)
        print(f"{r:5d} {off[0] * 1e3:11.0f}ms {on[0] * 1e3:10.0f}ms {ttft_ratios[-1]:7.3f} {off[1]:10.1f} "
              f"{on[1]:9.1f} {tput_ratios[-1]:7.2f} {cpu_ratios[-1]:11.2f} {share:7.1%}", flush=True)
    if ttft_ratios:
        print(f"median: TTFT p50 on/off {statistics.median(ttft_ratios):.3f} (goal <= 0.2), "
              f"throughput on/off {statistics.median(tput_ratios):.2f}x (goal >= 2; per CPU second "
              f"{statistics.median(cpu_ratios):.2f}x)")

    if args.skip_random:
        return
    print(f"\n(b) no shared prefix: random {args.random_len}-token prompts, {args.new_tokens} new tokens, base model")
    print(f"{'round':>5} {'tok/s off':>10} {'tok/s on':>9} {'on/off':>7} {'cpu on/off':>11}")
    ratios, cpu = [], []
    for r in range(args.rounds):
        work = random_workload(vocab, args, seed=2000 + r)
        order = (False, True) if r % 2 == 0 else (True, False)
        res = {mode: run(engines[mode], work, args.new_tokens) for mode in order}
        ratios.append(res[True][1] / res[False][1])
        cpu.append(res[True][3] / res[False][3])
        print(f"{r:5d} {res[False][1]:10.1f} {res[True][1]:9.1f} {ratios[-1]:7.3f} {cpu[-1]:11.3f}", flush=True)
    print(f"median: throughput on/off {statistics.median(ratios):.3f} (goal >= 0.97; per CPU second "
          f"{statistics.median(cpu):.3f})")
    for e in engines.values():
        e.shutdown()


if __name__ == "__main__":
    main()
