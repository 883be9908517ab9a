"""The served path: a real `loragate serve` driven by concurrent streaming clients (the openai
SDK's AsyncOpenAI), beside the in-process engine on the same workload.

One run, one machine, the random SmolLM-135M-shaped bf16 fixture (bench/common.py; its tokenizer
names all 49152 ids, so every token streams a chunk of text) and random rank-8 q/v adapters, at
the server's default flags (--dtype auto, --max-loras auto, prefix caching on, ...). Workloads:
  base  every request on the base model
  1     every request on one adapter
  200   requests round-robin over 200 adapters (the header says how many slots --max-loras gave)
Every prompt is random and sent once (served and in-process alike), so the prefix cache finds
nothing to reuse and the figures are of full prefill + decode, not of cache hits; the hits counted
over the run are printed at the end (expected 0).
at 1, 8 and 32 concurrent streams. A stream sends its next request (a 70-token prompt, 32 to 95
new tokens, 64 on average, greedy, ignore_eos) when the previous one ends. For each: output
tokens/s in steady state (from every stream's first token to the first stream running out of
requests: the connection burst at the start and the stragglers at the end left out, for the
in-process engine alike; --json also has the whole-run figures), time to first token (of the
requests after each stream's first: those all start at once) and inter-token latency percentiles
(ms, as the client sees chunks arrive), and the in-process engine's tokens/s on the same requests
at the same concurrency (`Engine.step()` in a loop, built from the same flags, the server idle
meanwhile): served / in-process shows what HTTP, SSE and the event loop cost. Also the CPU time per
output token of the server process (and of its main thread, uvicorn's event loop: the gateway), of
the in-process engine and of the client (Linux /proc): CPU time hardly moves with other load on
the host, so server over in-process CPU is the HTTP layer's cost even where the wall-clock ratio
is noise (on a busy 2-core VM it swung from 0.5 to 1.5 between runs). Each cell runs --rounds times, served
and in-process interleaved; medians are reported (a shared VM's speed drifts by tens of percent
within minutes).
Then: single-request latency on the base and on an adapter (70-token prompt, 10 new tokens,
requests alternating), and with --compare-dtypes the base workload at the largest stream count on
a server of each named dtype, beside --dtype auto.

    python -m bench.serve [--streams 1 8 32] [--workloads base 1 200] [--rounds 1]
                          [--compare-dtypes bfloat16 float32] [--plot docs/serve.png] [--json out.json]
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.common import (
    CACHE,
    machine,
    save_figure,
    smollm_checkpoint,
    write_random_adapters,
)
from loragate.testing import free_port

ROOT = Path(__file__).resolve().parent.parent
PROMPT = 70
NEW = 64
LAT_NEW = 10
BASE_NAME = "base"


_prompt_seed = iter(range(1, 1 << 62))


def prompt_ids(vocab: int) -> list[int]:
    """A random prompt never sent before in this run. The server runs at its default flags, prefix
    caching on: a prompt sent twice (a second round, the next stream count, the in-process engine
    after the server) would skip its prefill, and decode throughput and TTFT would be inflated by
    cache hits. Random prompts share no leading block, so every request prefills in full; the
    prefix-cache hits are counted and printed to show it."""
    g = torch.Generator().manual_seed(next(_prompt_seed))
    return torch.randint(10, vocab, (PROMPT,), generator=g).tolist()


def served_prefix_hits(url: str) -> float | None:
    """Prompt tokens the server found in its prefix cache so far (its /metrics), None if unknown."""
    import httpx

    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("loragate_prefix_cache_hits_total"):
            return float(line.split()[-1])
    return None


@dataclass
class Run:
    """One workload at one concurrency: per request its start and the times its tokens arrived;
    and the CPU seconds spent (the server's and its event loop's, or the in-process engine's)."""

    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)  # requests after each stream's first
    ttft_first: list[float] = field(default_factory=list)  # the streams' first requests: a burst at t=0
    itl: list[float] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # every token's arrival
    stream_first: list[float] = field(default_factory=list)  # each stream's first token
    stream_done: list[float] = field(default_factory=list)  # when each stream ran out of requests
    cpu: float | None = None  # server process (served) or this process (in-process)
    loop_cpu: float | None = None  # the server's main thread: uvicorn's event loop, the gateway
    client_cpu: float | None = None

    def cpu_us_per_token(self, what: str = "cpu") -> float | None:
        value = getattr(self, what)
        return None if value is None else value / self.tokens * 1e6

    @property
    def tok_s(self) -> float:
        """Output tokens/s in steady state: from the moment every stream has its first token to
        the moment the first stream runs out of requests (the whole run where that window is
        empty). The ramp at the start (every stream connecting and prefilling at once) and the
        tail at the end (the last few requests alone) are left out alike for both paths."""
        if self.stream_first and self.stream_done:
            t0, t1 = max(self.stream_first), min(self.stream_done)
            if t1 > t0:
                return sum(t0 <= a <= t1 for a in self.arrivals) / (t1 - t0)
        return self.total_tok_s

    @property
    def total_tok_s(self) -> float:
        return self.tokens / self.seconds

    def add(self, start: float, arrivals: list[float], tokens: int, first: bool) -> None:
        self.tokens += tokens
        self.arrivals.extend(arrivals)
        if arrivals:
            (self.ttft_first if first else self.ttft).append(arrivals[0] - start)
            self.itl.extend(b - a for a, b in itertools.pairwise(arrivals))
            if first:
                self.stream_first.append(arrivals[0])

    def ttfts(self) -> list[float]:
        """Time to first token of the requests sent in steady state (all, with one per stream)."""
        return self.ttft or self.ttft_first


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _f(value: float | None, width: int, digits: int = 0) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.{digits}f}"


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e3 if values else float("nan")


def lengths(n_requests: int) -> list[int]:
    """New tokens per request: NEW on average, spread over [NEW/2, 3*NEW/2) so that the streams,
    which all start at once, fall out of step after their first request instead of sending every
    later request in synchronised waves."""
    return [int(NEW * (0.5 + (i * 0.6180339887) % 1.0)) for i in range(n_requests)]


def models_for(workload: str, n_requests: int) -> list[str | None]:
    """Adapter name per request (None = base)."""
    if workload == BASE_NAME:
        return [None] * n_requests
    k = int(workload)
    return [f"adapter-{i % k:04d}" for i in range(n_requests)]


# ---- the server ------------------------------------------------------------------------------
def process_cpu(pid: int) -> tuple[float, float] | None:
    """(CPU seconds of process `pid`, of its main thread), from /proc; None where there is none.
    CPU time, unlike wall time, is barely moved by other work on the host: what the server spends
    per token beside what the engine alone spends is the HTTP/SSE layer's cost."""
    tick = os.sysconf("SC_CLK_TCK")

    def read(path: str) -> float:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    try:
        return read(f"/proc/{pid}/stat"), read(f"/proc/{pid}/task/{pid}/stat")
    except (OSError, ValueError, IndexError):
        return None



class Server:
    """`python -m loragate.cli serve ...` as a subprocess, up once /health answers."""

    def __init__(self, argv: list[str], log: Path) -> None:
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "loragate.cli", "serve", *argv, "--port", str(self.port), "--log-level", "warning"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600  # the first start on a host compiles the native kernels
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited early:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"server not up in 600 s:\n{log.read_text()[-3000:]}")
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                if r.status_code == 200:
                    self.health = r.json()
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


async def _stream_one(client, model: str, prompt: list[int], max_tokens: int) -> tuple[float, list[float], int]:
    """One streamed completion. The SSE lines are read raw (the SDK's `with_streaming_response`)
    rather than parsed into its pydantic chunk objects: the same bytes on the wire, but a client
    that costs ~4x less CPU per token, which on a small host would otherwise be taken from the
    server it measures. A line with non-empty text is a token arriving."""
    start = time.perf_counter()
    arrivals: list[float] = []
    tokens = 0
    async with client.completions.with_streaming_response.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}) as response:
        async for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            if '"text":""' not in line and '"choices":[]' not in line:
                arrivals.append(time.perf_counter())
            elif '"usage":{' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    return start, arrivals, tokens


async def _served(url: str, requests: list[tuple], streams: int, max_tokens: int) -> Run:
    from openai import AsyncOpenAI

    run = Run()
    todo = list(requests)
    async with AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600) as client:
        async def worker() -> None:
            first = True
            while todo:
                model, prompt, *n = todo.pop(0)
                run.add(*await _stream_one(client, model, prompt, n[0] if n else max_tokens), first)
                first = False
            run.stream_done.append(time.perf_counter())

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(streams)))
        run.seconds = time.perf_counter() - t
    return run


def served(url: str, requests: list[tuple], streams: int, max_tokens: int = NEW,
           server_pid: int | None = None) -> Run:
    before = process_cpu(server_pid) if server_pid else None
    client = time.process_time()
    run = asyncio.run(_served(url, requests, streams, max_tokens))
    run.client_cpu = time.process_time() - client
    after = process_cpu(server_pid) if server_pid else None
    if before and after:
        run.cpu, run.loop_cpu = after[0] - before[0], after[1] - before[1]
    return run


# ---- the same requests in process ------------------------------------------------------------
def in_process(engine, requests: list[tuple], streams: int, max_tokens: int = NEW) -> Run:
    """The closed loop of `served`, on an Engine stepped directly: a stream's next request is
    added as soon as its previous one finishes. Stepped on a thread of its own, as the server's
    AsyncEngine steps it: libgomp spins far longer at its barriers when the process's main thread
    drives the parallel regions, which on a busy host costs several times the CPU (measured: ~600 vs
    ~100 ms of CPU a batch-8 step with the host oversubscribed), so main-thread numbers would not
    compare with the server's."""
    with ThreadPoolExecutor(1, thread_name_prefix="bench-engine") as pool:
        return pool.submit(_in_process, engine, requests, streams, max_tokens).result()


def _in_process(engine, requests: list[tuple], streams: int, max_tokens: int) -> Run:
    from loragate.engine.outputs import EngineRequest
    from loragate.engine.sampling_params import SamplingParams

    run = Run()
    todo = list(requests)
    live: dict[str, tuple[float, list[float], bool]] = {}
    started = 0
    cpu = time.process_time()  # the whole process: the engine is all that runs meanwhile
    t = time.perf_counter()
    while todo or live:
        while todo and len(live) < streams:
            adapter, prompt, *n = todo.pop(0)
            rid = uuid.uuid4().hex
            live[rid] = (time.perf_counter(), [], started < streams)
            started += 1
            params = SamplingParams(max_tokens=n[0] if n else max_tokens, temperature=0.0, ignore_eos=True)
            engine.add_request(EngineRequest(rid, prompt, params, adapter=adapter))
        outs = engine.step()
        now = time.perf_counter()
        if not outs and not engine.scheduler.running:
            time.sleep(0.0005)  # an adapter still loading on its own thread: leave it the GIL
        for out in outs:
            if out.new_token_ids:
                live[out.request_id][1].append(now)
            if out.finished:
                if out.finish_reason not in ("length", "stop"):
                    raise RuntimeError(out.error or out.finish_reason)
                start, arrivals, first = live.pop(out.request_id)
                run.add(start, arrivals, out.completion_tokens, first)
                if not todo:  # this stream has no request left
                    run.stream_done.append(now)
    run.seconds = time.perf_counter() - t
    run.cpu = time.process_time() - cpu
    return run


# ---- plots -----------------------------------------------------------------------------------
def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    label = {BASE_NAME: "base model only", "1": "1 adapter"}
    for wl in dict.fromkeys(r["workload"] for r in rows):
        rs = [r for r in rows if r["workload"] == wl]
        x = [r["streams"] for r in rs]
        name = label.get(wl, f"{wl} adapters")
        line, = ax1.plot(x, [r["served_tok_s"] for r in rs], marker="o", label=f"{name} (served)")
        ax1.plot(x, [r["inproc_tok_s"] for r in rs], ls="--", marker=".", color=line.get_color(), alpha=0.6,
                 label=f"{name} (in-process engine)")
        ax2.plot(x, [r["ttft_p50_ms"] for r in rs], marker="o", color=line.get_color(), label=f"{name} p50")
        ax2.plot(x, [r["ttft_p90_ms"] for r in rs], ls=":", marker=".", color=line.get_color(), label=f"{name} p90")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["streams"] for r in rows}), [str(s) for s in sorted({r["streams"] for r in rows})])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("concurrent streams")
        ax.grid(alpha=0.3)
    ax1.set_ylabel("output tokens / s")
    ax1.set_title("throughput")
    ax1.set_ylim(bottom=0)
    ax2.set_ylabel("time to first token (ms)")
    ax2.set_title("time to first token")
    ax2.set_ylim(bottom=0)
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


# ---- main ------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--workloads", nargs="+", default=[BASE_NAME, "1", "200"],
                    help="'base' or a number of adapters the requests go round-robin over")
    ap.add_argument("--requests-per-stream", type=int, default=3)
    ap.add_argument("--min-requests", type=int, default=4, help="at least this many requests per cell")
    ap.add_argument("--rounds", type=int, default=1, help="served and in-process, interleaved, this many times")
    ap.add_argument("--latency-samples", type=int, default=8, help="single requests on base and adapter each")
    ap.add_argument("--dtype", default="auto", help="the server's --dtype for the main matrix")
    ap.add_argument("--compare-dtypes", nargs="*", default=[],
                    help="also serve the base workload at the largest stream count at these dtypes")
    ap.add_argument("--serve-args", default="", help="extra `loragate serve` flags, e.g. '--max-loras 64'")
    ap.add_argument("--skip-in-process", action="store_true")
    ap.add_argument("--plot", nargs="?", const="docs/serve.png", help="write the figure (PNG; default docs/serve.png)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()

    base = smollm_checkpoint("bfloat16", full_vocab_tokenizer=True)  # every token streams text
    n_adapters = max([int(w) for w in args.workloads if w != BASE_NAME] + [1])
    adapter_dir = CACHE / "serve-adapters-r8-q_proj-v_proj"
    write_random_adapters(base, adapter_dir, n_adapters, rank=8, targets=("q_proj", "v_proj"))
    serve_argv = ["--model", str(base), "--served-model-name", BASE_NAME, "--adapter-dir", str(adapter_dir),
                  *args.serve_args.split()]
    logs = CACHE / "serve-logs"
    logs.mkdir(parents=True, exist_ok=True)

    from loragate.cli import build_configs, build_parser

    server = Server([*serve_argv, "--dtype", args.dtype], logs / "server.log")
    h = server.health
    cfg = build_configs(build_parser().parse_args(["serve", *serve_argv, "--dtype", args.dtype])).engine
    print(f"# bench/serve.py  {time.strftime('%Y-%m-%d')}  {machine()}  threads={torch.get_num_threads()}")
    print(f"# server --dtype {args.dtype}: dtype {h.get('dtype')} ({h.get('dtype_reason')}); native CPU kernels "
          f"{h.get('cpu_kernels')}; flags: {' '.join(args.serve_args.split()) or 'defaults'}; prefix caching "
          f"{'on (every prompt is new: no hits expected)' if cfg.enable_prefix_caching else 'off'}")
    engine = None
    if not args.skip_in_process:
        from loragate.engine.engine import Engine

        engine = Engine(cfg)
        engine.start()
        print(f"# in-process engine: {engine.slot_plan.describe() if engine.slot_plan else 'no LoRA'}")
    vocab = 49152
    rows: list[dict] = []
    try:
        print(f"\n(a) {PROMPT}-token prompts, {NEW // 2}-{NEW * 3 // 2 - 1} new tokens ({NEW} on average), closed loop "
              "per stream; tok/s in steady state; TTFT of the requests after each stream's first; served vs "
              f"in-process (median of {args.rounds} interleaved round(s)); latencies in ms as the client sees them")
        print(f"{'workload':>8} {'streams':>7} {'served tok/s':>12} {'in-proc tok/s':>13} {'served/in':>9} "
              f"{'TTFT p50':>8} {'p90':>7} {'p99':>7} {'ITL p50':>7} {'p90':>6} {'p99':>6}  "
              f"CPU us/token: {'server':>6} {'(loop)':>6} {'in-proc':>7} {'client':>6} {'server/in':>9}")
        for wl in args.workloads:
            warm = [(m, prompt_ids(vocab)) for m in dict.fromkeys(models_for(wl, n_adapters))]
            served(server.url, [(m or BASE_NAME, p) for m, p in warm], min(32, len(warm)), max_tokens=2)
            if engine is not None:
                in_process(engine, warm, min(32, len(warm)), max_tokens=2)
            for s in args.streams:
                n = max(args.min_requests, s * args.requests_per_stream)
                shape = list(zip(models_for(wl, n), lengths(n)))  # the same requests on both paths, new prompts
                sv, ip = [], []
                for _ in range(args.rounds):
                    sv.append(served(server.url, [(m or BASE_NAME, prompt_ids(vocab), k) for m, k in shape], s,
                                     server_pid=server.proc.pid))
                    if engine is not None:
                        ip.append(in_process(engine, [(m, prompt_ids(vocab), k) for m, k in shape], s))
                ttft = [x for r in sv for x in r.ttfts()]
                itl = [x for r in sv for x in r.itl]
                row = {"workload": wl, "streams": s, "requests": n,
                           "served_tok_s": statistics.median(r.tok_s for r in sv),
                           "served_total_tok_s": statistics.median(r.total_tok_s for r in sv),
                           "inproc_tok_s": statistics.median(r.tok_s for r in ip) if ip else None,
                           "inproc_total_tok_s": statistics.median(r.total_tok_s for r in ip) if ip else None,
                           "ttft_p50_ms": pct(ttft, 50), "ttft_p90_ms": pct(ttft, 90), "ttft_p99_ms": pct(ttft, 99),
                           "itl_p50_ms": pct(itl, 50), "itl_p90_ms": pct(itl, 90), "itl_p99_ms": pct(itl, 99),
                           "inproc_ttft_p50_ms": pct([x for r in ip for x in r.ttfts()], 50) if ip else None,
                           "inproc_itl_p50_ms": pct([x for r in ip for x in r.itl], 50) if ip else None,
                           "per_round_served_over_inproc": [a.tok_s / b.tok_s for a, b in zip(sv, ip)],
                           "server_cpu_us_tok": _median(r.cpu_us_per_token() for r in sv),
                           "loop_cpu_us_tok": _median(r.cpu_us_per_token("loop_cpu") for r in sv),
                           "client_cpu_us_tok": _median(r.cpu_us_per_token("client_cpu") for r in sv),
                           "inproc_cpu_us_tok": _median(r.cpu_us_per_token() for r in ip)}
                row["server_over_inproc_cpu"] = (row["server_cpu_us_tok"] / row["inproc_cpu_us_tok"]
                                                 if row["server_cpu_us_tok"] and row["inproc_cpu_us_tok"] else None)
                rows.append(row)
                ratio = statistics.median(row["per_round_served_over_inproc"]) if ip else None
                ips = _f(row["inproc_tok_s"], 13, 1)
                rs = _f(ratio, 9, 2)
                print(f"{wl:>8} {s:7d} {row['served_tok_s']:12.1f} {ips} {rs} {row['ttft_p50_ms']:8.1f} "
                      f"{row['ttft_p90_ms']:7.1f} {row['ttft_p99_ms']:7.1f} {row['itl_p50_ms']:7.1f} "
                      f"{row['itl_p90_ms']:6.1f} {row['itl_p99_ms']:6.1f}  {'':13} {_f(row['server_cpu_us_tok'], 6)} "
                      f"{_f(row['loop_cpu_us_tok'], 6)} {_f(row['inproc_cpu_us_tok'], 7)} "
                      f"{_f(row['client_cpu_us_tok'], 6)} {_f(row['server_over_inproc_cpu'], 9, 2)}", flush=True)
        base_rows = {r["streams"]: r for r in rows if r["workload"] == BASE_NAME}
        for r in rows:
            if r["workload"] != BASE_NAME and r["streams"] in base_rows:
                r["vs_base"] = r["served_tok_s"] / base_rows[r["streams"]]["served_tok_s"]
        if any("vs_base" in r for r in rows):
            print("served throughput vs base-only: " + ", ".join(
                f"{r['workload']} adapters @ {r['streams']} streams {r['vs_base']:.2f}"
                for r in rows if "vs_base" in r))

        # (b) single-request latency, base vs adapter, alternating
        adapter = "adapter-0000"
        lat: dict[str, list[float]] = {BASE_NAME: [], adapter: []}
        served(server.url, [(adapter, prompt_ids(vocab))], 1, max_tokens=2)  # resident before timing
        for i in range(args.latency_samples):
            for model in (BASE_NAME, adapter):
                t = time.perf_counter()
                served(server.url, [(model, prompt_ids(vocab))], 1, max_tokens=LAT_NEW)
                lat[model].append(time.perf_counter() - t)
        ratio = statistics.median(a / b for a, b in zip(lat[adapter], lat[BASE_NAME]))
        print(f"\n(b) one request at a time, {PROMPT}-token prompt + {LAT_NEW} new tokens, served "
              f"({args.latency_samples} each, alternating): base {statistics.median(lat[BASE_NAME]) * 1e3:.1f} ms, "
              f"adapter {statistics.median(lat[adapter]) * 1e3:.1f} ms, adapter / base {ratio:.2f} "
              "(median of per-pair ratios)")
        latency = {"base_ms": statistics.median(lat[BASE_NAME]) * 1e3,
                       "adapter_ms": statistics.median(lat[adapter]) * 1e3, "adapter_over_base": ratio}
        hits = {"served": served_prefix_hits(server.url),
                    "in_process": engine.kv.allocator.hits if engine is not None else None}
        print(f"prefix-cache hits over the run (prompt tokens): served {hits['served']}, in-process "
              f"{hits['in_process']}")
    finally:
        server.stop()
        if engine is not None:
            engine.shutdown()

    dtypes = {}
    if args.compare_dtypes:
        s = max(args.streams)
        n = max(args.min_requests, s * args.requests_per_stream)
        shape = lengths(n)
        servers = {d: Server([*serve_argv, "--dtype", d], logs / f"server-{d}.log")
                   for d in [args.dtype, *args.compare_dtypes]}
        try:
            runs: dict[str, list[float]] = {d: [] for d in servers}
            for d, srv in servers.items():  # warm-up
                served(srv.url, [(BASE_NAME, prompt_ids(vocab))] * 2, 2, max_tokens=2)
            for _ in range(max(args.rounds, 1)):
                for d, srv in servers.items():  # only one server busy at a time; the others idle
                    runs[d].append(served(srv.url, [(BASE_NAME, prompt_ids(vocab), k) for k in shape], s).tok_s)
        finally:
            for srv in servers.values():
                srv.stop()
        best = max((d for d in servers if d != args.dtype), key=lambda d: statistics.median(runs[d]))
        print(f"\n(c) base model, {s} streams, served at each --dtype (median of {max(args.rounds, 1)} interleaved "
              "round(s)):")
        for d, srv in servers.items():
            dtypes[d] = {"tok_s": statistics.median(runs[d]), "dtype": srv.health.get("dtype")}
            print(f"  --dtype {d:9s} ({srv.health.get('dtype')}): {dtypes[d]['tok_s']:.1f} tok/s")
        print(f"  {args.dtype} / best explicit ({best}): "
              f"{statistics.median(runs[args.dtype]) / statistics.median(runs[best]):.2f}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "health": h, "rows": rows, "latency": latency, "dtypes": dtypes,
                           "prefix_cache_hits": hits}, f, indent=2)
    if args.plot:
        plot(rows, Path(args.plot), f"loragate serve, SmolLM-135M-shaped model, {h.get('dtype')}, "
             f"{PROMPT}-token prompts + {NEW} new tokens on average, rank-8 adapters, default flags\n{machine()}")


if __name__ == "__main__":
    main()
