"""Scale-out on Ray Serve: a Zipf-distributed adapter workload over 2 replicas, with and without
adapter multiplexing (Ray's multiplexed routing fed by each engine's adapter cache).

Each mode starts a fresh application on a local Ray (bounded CPUs, no dashboard): the same
engine config on every replica, the same seeded request sequence (adapter i drawn with probability
proportional to 1 / (i + 1) ** s), sent as streams at a fixed concurrency through Ray's HTTP proxy.
Printed per mode: adapter loads into device slots per 1000 requests (summed over replicas from
their adapter caches, cold loads included), client-side TTFT p50/p99 (request sent -> first
streamed token), and how many adapters ended up resident on more than one replica.

    python bench/scaleout.py [--adapters 32] [--max-loras 4] [--requests 400] [--concurrency 8]
                             [--zipf 1.1] [--model tiny|smollm] [--num-cpus 2]
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import CACHE, build_tokenizer_cached, machine, smollm_checkpoint, write_random_adapters
from loragate.engine.config import EngineConfig
from loragate.gateway.settings import GatewaySettings


def tiny_checkpoint() -> Path:
    from loragate.testing import build_checkpoint

    out = CACHE / "tiny-llama3"
    if not (out / "config.json").exists():
        build_checkpoint(out, "llama3", tokenizer_dir=build_tokenizer_cached())
    return out


def workload(n_adapters: int, n_requests: int, s: float, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    weights = [1 / (i + 1) ** s for i in range(n_adapters)]
    names = [f"adapter-{i:04d}" for i in range(n_adapters)]
    return [(rng.choices(names, weights)[0], f"request {k} about cache and kernels") for k in range(n_requests)]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def drive(url: str, requests: list[tuple[str, str]], concurrency: int, max_tokens: int) -> list[float]:
    sem = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []

    async def one(client: httpx.AsyncClient, model: str, prompt: str) -> None:
        async with sem:
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "ignore_eos": True}
            t0 = time.perf_counter()
            first = None
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"{model}: HTTP {r.status_code} {await r.aread()!r}")
                async for line in r.aiter_lines():
                    if first is None and line.startswith("data: {"):
                        first = time.perf_counter() - t0
            ttfts.append(first if first is not None else float("nan"))

    async with httpx.AsyncClient(timeout=300) as client:
        await asyncio.gather(*(one(client, m, p) for m, p in requests))
    return ttfts


def run_mode(multiplex: bool, engine: EngineConfig, args, port: int, requests) -> dict:
    from ray import serve

    from loragate.cluster.app import STATE_DEPLOYMENT, build_app
    from loragate.cluster.config import ClusterConfig

    name = f"scaleout-{'mux' if multiplex else 'plain'}"
    cluster = ClusterConfig(replicas=2, multiplex=multiplex, replica_num_cpus=args.num_cpus / 2, app_name=name)
    serve.run(build_app(engine, GatewaySettings(), cluster), name=name, route_prefix="/")
    state = serve.get_deployment_handle(STATE_DEPLOYMENT, name)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while len(state.snapshot.remote().result(timeout_s=10)) < 2 or httpx.get(url + "/health").status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("replicas did not come up")
        time.sleep(0.2)
    t0 = time.perf_counter()
    ttfts = asyncio.run(drive(url, requests, args.concurrency, args.max_tokens))
    wall = time.perf_counter() - t0
    deadline = time.monotonic() + 30
    while True:  # the reports trail the requests by up to one report interval
        reports = state.snapshot.remote().result(timeout_s=10)
        if all(r.stats.running == 0 and r.stats.waiting == 0 for r in reports) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    time.sleep(2 * cluster.report_interval)
    reports = state.snapshot.remote().result(timeout_s=10)
    loads = sum(a.load_count for r in reports for a in r.adapters)
    served = {r.replica_id: sum(a.requests_served for a in r.adapters) for r in reports}
    holders: dict[str, int] = {}
    for r in reports:
        for a in r.adapters:
            if a.requests_served:
                holders[a.name] = holders.get(a.name, 0) + 1
    serve.delete(name)
    return {"mode": "multiplexed" if multiplex else "not multiplexed", "loads": loads,
            "loads_per_1000": 1000 * loads / len(requests), "p50": statistics.median(ttfts),
            "p99": percentile(ttfts, 0.99), "wall": wall, "served": sorted(served.values()),
            "shared": sum(1 for n in holders.values() if n > 1), "used": len(holders)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--max-loras", type=int, default=4, help="device slots per replica")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--model", choices=["tiny", "smollm"], default="tiny")
    p.add_argument("--num-cpus", type=float, default=2, help="CPUs the local Ray may use (split over 2 replicas)")
    p.add_argument("--modes", nargs="+", choices=["mux", "plain"], default=["mux", "plain"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import ray
    from ray import serve

    from loragate.cluster.launch import local_runtime_env
    from tests.test_examples import free_port

    base = tiny_checkpoint() if args.model == "tiny" else smollm_checkpoint("bfloat16")
    dtype = "float32" if args.model == "tiny" else "bfloat16"
    root = CACHE / f"scaleout-adapters-{args.model}"
    write_random_adapters(base, root, args.adapters, dtype=dtype)
    engine = EngineConfig(model=str(base), served_model_name="base", device="cpu", dtype=dtype, adapter_dir=str(root),
                          max_loras=args.max_loras, max_lora_rank=8, max_num_seqs=args.concurrency,
                          kv_cache_memory=64 << 20, max_model_len=256)
    requests = workload(args.adapters, args.requests, args.zipf, args.seed)
    print(f"# {machine()}")
    print(f"# {args.model} model, {args.adapters} adapters (Zipf s={args.zipf}), {args.max_loras} slots per replica, "
          f"2 replicas, {args.requests} requests x {args.max_tokens} tokens at concurrency {args.concurrency}; "
          f"{len({m for m, _ in requests})} distinct adapters drawn")
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, object_store_memory=100 << 20, log_to_driver=False,
             runtime_env=local_runtime_env())
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        results = [run_mode(mode == "mux", engine, args, port, requests) for mode in args.modes]
    finally:
        serve.shutdown()
        ray.shutdown()
    print("| routing | adapter loads | loads / 1000 req | TTFT p50 ms | TTFT p99 ms | wall s | requests per replica "
          "| adapters on both replicas / used |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['loads']} | {r['loads_per_1000']:.0f} | {1000 * r['p50']:.1f} | "
              f"{1000 * r['p99']:.1f} | {r['wall']:.1f} | {r['served']} | {r['shared']} / {r['used']} |")


if __name__ == "__main__":
    main()
