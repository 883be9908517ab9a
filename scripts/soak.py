"""Soak test: a real `loragate serve` under concurrent streams, adapter churn, faults and bad input.

    python scripts/soak.py --duration 60            # what CI runs (tests/test_soak.py)
    python scripts/soak.py --duration 600 --json    # the 10-minute run recorded in bench/RESULTS.md

It builds a tiny random checkpoint and --adapters PEFT adapters in a temporary directory, starts
`loragate serve` on them (float32, so greedy outputs are batch-invariant), computes the greedy
reference output of every (model, prompt, endpoint) alone, warms up (including one step of every
token count up to --shape-sweep, see `shape_sweep`), then for --duration seconds keeps --streams
clients busy:
  * streaming greedy chat and text completions over the base model and every adapter, each
    completed one compared with its reference;
  * 10% of streams disconnect after a few chunks (--disconnect-rate);
  * 10% of requests are malformed (--malformed-rate): bad JSON, wrong types, unknown models,
    oversized prompts and bodies; each must get its expected 4xx;
  * a churn task registers copies of adapters through the admin API, sends traffic to them and
    deletes them while they may be in use;
  * a corrupt adapter folder dropped into --adapter-dir is requested (a clear 400 each time).
At the end (after the server has gone idle) it checks: no unexpected status (no 5xx at all), no
mismatching greedy output, running and waiting 0, every KV block free (or held by the prefix cache
where the server reports one), resident memory grown by less than --max-rss-growth since the end of
warm-up, and open file descriptors and threads back to their values at the end of warm-up. It
prints requests served, errors by class, and memory, and exits 1 if any check failed.
Everything is bounded: the run, each request (timeouts), and every wait.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loragate.testing import ServeProcess, build_adapter, build_checkpoint, build_tokenizer  # noqa: E402

ADMIN = "sk-soak-admin"
PROMPTS = ["the quick brown fox", "hello world adapter", "cache kernel latency", "stream token batch"]
MAX_TOKENS = 12
TARGETS = [("q_proj", "v_proj"), ("o_proj",), ("gate_proj", "down_proj"), ("k_proj", "up_proj")]


@dataclass
class Stats:
    served: int = 0  # requests answered as expected (completed, refused as expected, or cut by us)
    completed: int = 0  # greedy requests that ran to the end and were compared
    disconnected: int = 0
    mismatches: list = field(default_factory=list)
    classes: Counter = field(default_factory=Counter)  # "200", "400 adapter_load_error", "disconnect", ...
    unexpected: list = field(default_factory=list)


def proc_status(pid: int) -> dict:
    """RSS (bytes), open file descriptors and threads of a process, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return {"rss": int(fields["VmRSS"].split()[0]) * 1024, "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def build_fixture(root: Path, n_adapters: int) -> tuple[Path, Path, Path, list[str]]:
    tok = build_tokenizer(root / "tok")
    base = build_checkpoint(root / "base", "llama3", tokenizer_dir=tok)
    adapter_dir, churn_src = root / "adapters", root / "churn-src"
    names = []
    for i in range(n_adapters):
        name = f"ad-{i}"
        build_adapter(base, adapter_dir / name, rank=2 + 2 * (i % 4), alpha=8, targets=TARGETS[i % 4], seed=100 + i)
        names.append(name)
    churn_src.mkdir()
    return base, adapter_dir, churn_src, names


def make_corrupt(adapter_dir: Path, source: Path) -> None:
    bad = adapter_dir / "corrupt"
    shutil.copytree(source, bad)
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # truncated


class Soak:
    def __init__(self, args: argparse.Namespace, url: str, models: list[str]) -> None:
        self.args = args
        self.url = url
        self.models = models
        self.refs: dict[tuple[str, str, int], str] = {}
        self.live_churn: dict[str, str] = {}  # churned name -> the adapter it copies
        self.stats = Stats()
        self.rng = random.Random(args.seed)
        self.deadline = 0.0

    # ---- requests ---------------------------------------------------------------------------
    def body(self, kind: str, model: str, p: int, stream: bool) -> dict:
        common = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": stream}
        if kind == "chat":
            return {**common, "messages": [{"role": "user", "content": PROMPTS[p]}]}
        return {**common, "prompt": PROMPTS[p]}

    @staticmethod
    def path(kind: str) -> str:
        return "/v1/chat/completions" if kind == "chat" else "/v1/completions"

    @staticmethod
    def text_of(kind: str, chunk: dict) -> str:
        if not chunk.get("choices"):
            return ""
        c = chunk["choices"][0]
        return (c.get("delta", {}).get("content") or "") if kind == "chat" else (c.get("text") or "")

    async def references(self, client: httpx.AsyncClient) -> None:
        for model in self.models:
            for kind in ("chat", "completion"):
                for p in range(len(PROMPTS)):
                    r = await client.post(self.path(kind), json=self.body(kind, model, p, False))
                    r.raise_for_status()
                    c = r.json()["choices"][0]
                    self.refs[(model, kind, p)] = c["message"]["content"] if kind == "chat" else c["text"]

    async def shape_sweep(self, client: httpx.AsyncClient, max_tokens_per_step: int) -> None:
        """One request at a time, prefilling 1, 2, ... `max_tokens_per_step` tokens in one step.

        On the CPU, oneDNN caches a primitive (and its buffers) per input shape of every prepacked
        matmul, up to 1024 shapes per cache; a step's shape is its token count. Without this sweep
        the steady state keeps meeting new token counts and RSS climbs towards that bound for
        minutes, which would hide (or fake) a leak: after it, growth means something else."""
        rng = random.Random(1)
        for m in range(1, max_tokens_per_step + 1):
            k = -(-m // 200)  # prompts of at most 200 tokens (max_model_len 256)
            sizes = [m // k + (1 if i < m % k else 0) for i in range(k)]
            prompt = [[rng.randrange(10, 400) for _ in range(n)] for n in sizes]
            r = await client.post("/v1/completions", json={"model": self.models[0], "prompt": prompt,
                                                           "max_tokens": 1, "temperature": 0})
            self.record(f"sweep {r.status_code}", r.status_code == 200, r.text)

    def record(self, cls: str, ok: bool, detail: str = "") -> None:
        self.stats.classes[cls] += 1
        if ok:
            self.stats.served += 1
        else:
            self.stats.unexpected.append(f"{cls}: {detail[:300]}")

    async def stream_one(self, client: httpx.AsyncClient, model: str, ref_model: str | None) -> None:
        kind = self.rng.choice(["chat", "completion"])
        p = self.rng.randrange(len(PROMPTS))
        cut_after = self.rng.randint(1, MAX_TOKENS - 1) if self.rng.random() < self.args.disconnect_rate else None
        text, chunks = "", 0
        async with client.stream("POST", self.path(kind), json=self.body(kind, model, p, True)) as r:
            if r.status_code != 200:
                body = (await r.aread()).decode(errors="replace")
                code = _code(body)
                # a churned adapter may be deleted between choosing it and the request: 404 is fine
                ok = r.status_code == 404 and ref_model is not None and code == "model_not_found"
                self.record(f"{r.status_code} {code}", ok, body)
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    self.record(f"stream_error {chunk['error'].get('code')}", False, data)
                    return
                text += self.text_of(kind, chunk)
                chunks += 1
                if cut_after is not None and chunks >= cut_after:
                    self.stats.disconnected += 1
                    self.record("disconnect", True)
                    return  # leaving the block closes the connection mid-stream
        expected = self.refs[(ref_model or model, kind, p)]
        self.stats.completed += 1
        if text != expected:
            self.stats.mismatches.append((model, kind, p, text, expected))
            self.record("200 mismatch", False, f"{model} {kind} {p}: {text!r} != {expected!r}")
        else:
            self.record("200", True)

    async def malformed(self, client: httpx.AsyncClient) -> None:
        model = self.rng.choice(self.models)
        cases = [
            (b"{not json", {400}),
            (json.dumps({"model": model, "prompt": 123}).encode(), {400}),
            (json.dumps({"model": "no-such-adapter", "prompt": "x"}).encode(), {404}),
            (json.dumps({"model": model, "messages": []}).encode(), {400}),
            (json.dumps({"model": model, "prompt": "x", "max_tokens": 10**6}).encode(), {400}),
            (json.dumps({"model": model, "prompt": "x", "temperature": "hot"}).encode(), {400}),
            (json.dumps({"model": model, "prompt": "x", "n": 10**6}).encode(), {400}),
            (json.dumps({"model": model, "prompt": "x", "extra": "y" * (2 << 20)}).encode(), {413}),
            (b'{"model": "' + model.encode() + b'", "prompt": "\\ud800"}', {400}),
            (b'{"model": "' + model.encode() + b'", "prompt": "x", "e": ' + b"[" * 500 + b"]" * 500 + b"}", {400}),
        ]
        raw, expected = self.rng.choice(cases)
        r = await client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
        self.record(f"{r.status_code} {_code(r.text)}", r.status_code in expected, r.text)

    async def corrupt(self, client: httpx.AsyncClient) -> None:
        r = await client.post("/v1/completions", json={"model": "corrupt", "prompt": "x", "max_tokens": 2})
        ok = r.status_code == 400 and _code(r.text) == "adapter_load_error" and "corrupt" in r.text
        self.record(f"{r.status_code} {_code(r.text)}", ok, r.text)

    async def worker(self, client: httpx.AsyncClient) -> None:
        while time.monotonic() < self.deadline:
            roll = self.rng.random()
            try:
                if roll < self.args.malformed_rate:
                    await self.malformed(client)
                elif roll < self.args.malformed_rate + 0.02:
                    await self.corrupt(client)
                elif self.live_churn and roll < self.args.malformed_rate + 0.10:
                    name, src = self.rng.choice(list(self.live_churn.items()))
                    await self.stream_one(client, name, src)
                else:
                    await self.stream_one(client, self.rng.choice(self.models), None)
            except httpx.HTTPError as exc:
                self.record(f"transport {type(exc).__name__}", False, str(exc))

    async def churn(self, client: httpx.AsyncClient, churn_src: Path, sources: list[str], adapter_dir: Path) -> None:
        i = 0
        while time.monotonic() < self.deadline:
            src = sources[i % len(sources)]
            name = f"churn-{i}"
            path = churn_src / name
            shutil.copytree(adapter_dir / src, path)
            r = await client.post("/v1/adapters", json={"name": name, "path": str(path)})
            self.record(f"admin register {r.status_code}", r.status_code == 200, r.text)
            if r.status_code == 200:
                self.live_churn[name] = src
            await asyncio.sleep(self.args.churn_seconds)
            self.live_churn.pop(name, None)
            r = await client.delete(f"/v1/adapters/{name}")
            self.record(f"admin delete {r.status_code}", r.status_code == 200, r.text)
            shutil.rmtree(path, ignore_errors=True)
            i += 1

    async def run_phase(self, seconds: float, churn_args: tuple | None) -> None:
        self.deadline = time.monotonic() + seconds
        limits = httpx.Limits(max_connections=self.args.streams + 8, max_keepalive_connections=self.args.streams + 8)
        headers = {"Authorization": f"Bearer {ADMIN}"}
        async with httpx.AsyncClient(base_url=self.url, headers=headers, timeout=120, limits=limits) as client:
            tasks = [self.worker(client) for _ in range(self.args.streams)]
            if churn_args is not None:
                tasks.append(self.churn(client, *churn_args))
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=seconds + 180)


def _code(body: str) -> str | None:
    try:
        return json.loads(body)["error"].get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def wait_until(cond, timeout: float, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    value = cond()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = cond()
    return value


def idle_checks(url: str) -> dict:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30).text
    used = metric(text, "loragate_kv_blocks_used") or 0.0
    cached = metric(text, "loragate_kv_blocks_cached") or 0.0  # a prefix cache's blocks count as free
    return {"running": metric(text, "loragate_num_requests_running"),
            "waiting": metric(text, "loragate_num_requests_waiting"), "kv_blocks_in_use": used - cached}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of soak after warm-up")
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds of the same load before the baseline")
    ap.add_argument("--streams", type=int, default=64, help="concurrent clients")
    ap.add_argument("--adapters", type=int, default=12)
    ap.add_argument("--disconnect-rate", type=float, default=0.10)
    ap.add_argument("--malformed-rate", type=float, default=0.10)
    ap.add_argument("--churn-seconds", type=float, default=1.5, help="how long each churned adapter lives")
    ap.add_argument("--max-rss-growth", type=float, default=0.05)
    ap.add_argument("--shape-sweep", type=int, default=512, help="warm-up: prefill every token count up to this "
                    "once (fills the CPU matmul primitive caches; 0 = skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="keep the fixture and server log here (default: a temporary dir)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)

    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="loragate-soak-"))
    tmp.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    base, adapter_dir, churn_src, names = build_fixture(tmp, args.adapters)
    server = ServeProcess(["--model", str(base), "--served-model-name", "soak-base", "--device", "cpu",
                           "--dtype", "float32", "--adapter-dir", str(adapter_dir), "--allowed-adapter-dir",
                           str(churn_src), "--api-key", ADMIN, "--max-loras", "8", "--max-lora-rank", "8",
                           "--kv-cache-memory", "64MiB", "--max-model-len", "256", "--max-num-seqs", "128",
                           "--max-request-bytes", "1MiB", "--shutdown-timeout", "10"],
                          tmp / "server.log", env={"TOKENIZERS_PARALLELISM": "false"}, cwd=REPO)
    report: dict = {"duration_s": args.duration, "streams": args.streams, "adapters": args.adapters}
    failures: list[str] = []
    with server:
        soak = Soak(args, server.url, ["soak-base", *names])
        pid = server.proc.pid

        async def warm() -> None:
            headers = {"Authorization": f"Bearer {ADMIN}"}
            async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120) as client:
                await soak.references(client)
                await soak.shape_sweep(client, args.shape_sweep)

        asyncio.run(warm())
        make_corrupt(adapter_dir, adapter_dir / names[0])
        churn_args = (churn_src, names[:4], adapter_dir)
        asyncio.run(soak.run_phase(args.warmup, churn_args))
        wait_until(lambda: idle_checks(server.url)["running"] == 0, 60)
        baseline = settle(pid)
        warm_stats = soak.stats
        soak.stats = Stats()
        t_soak = time.monotonic()
        asyncio.run(soak.run_phase(args.duration, churn_args))
        soak_seconds = time.monotonic() - t_soak
        idle = wait_until(lambda: (c := idle_checks(server.url))["running"] == 0 and c["waiting"] == 0
                          and c["kv_blocks_in_use"] == 0 and c, 60) or idle_checks(server.url)
        end = wait_until(lambda: (s := proc_status(pid))["fds"] <= baseline["fds"]
                         and s["threads"] <= baseline["threads"] and s, 30) or proc_status(pid)
        st = soak.stats
        growth = end["rss"] / baseline["rss"] - 1
        report.update({
            "requests_served": st.served, "greedy_completed_and_checked": st.completed,
            "disconnects": st.disconnected, "requests_per_second": round(sum(st.classes.values()) / soak_seconds, 1),
            "classes": dict(st.classes.most_common()), "unexpected": st.unexpected[:20],
            "warmup_requests": sum(warm_stats.classes.values()), "warmup_unexpected": warm_stats.unexpected[:20],
            "idle": idle, "rss_mb": {"after_warmup": round(baseline["rss"] / 2**20, 1),
                                     "end": round(end["rss"] / 2**20, 1)}, "rss_growth": round(growth, 4),
            "fds": {"after_warmup": baseline["fds"], "end": end["fds"]},
            "threads": {"after_warmup": baseline["threads"], "end": end["threads"]},
        })
        if st.unexpected or warm_stats.unexpected:
            failures.append(f"{len(st.unexpected) + len(warm_stats.unexpected)} unexpected answers")
        if st.mismatches or warm_stats.mismatches:
            failures.append(f"{len(st.mismatches) + len(warm_stats.mismatches)} greedy outputs differ from reference")
        if st.completed == 0:
            failures.append("no greedy request completed")
        if idle["running"] != 0 or idle["waiting"] != 0 or idle["kv_blocks_in_use"] != 0:
            failures.append(f"not idle at the end: {idle}")
        if growth >= args.max_rss_growth:
            failures.append(f"RSS grew {growth:.1%} (limit {args.max_rss_growth:.0%})")
        if end["fds"] > baseline["fds"] or end["threads"] > baseline["threads"]:
            failures.append(f"fds/threads not back: {baseline} -> {end}")
        code = server.stop(timeout=60)
        if code != 0:
            failures.append(f"server exited {code}")
        log = server.log()
        if ADMIN in log or str(adapter_dir) in log or str(churn_src) in log:
            failures.append("a key or an adapter path appears in the server log")
        if "Traceback" in log:
            failures.append("the server log has a traceback")
    report["total_seconds"] = round(time.monotonic() - t0, 1)
    report["failures"] = failures
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for k, v in report.items():
            print(f"{k}: {v}")
        print("SOAK " + ("FAILED: " + "; ".join(failures) if failures else "OK"))
    if not args.workdir:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failures else 0


def settle(pid: int, seconds: float = 3.0, timeout: float = 30.0) -> dict:
    """The process's counters once they stop falling (connections closed, workers idle)."""
    last = proc_status(pid)
    deadline = time.monotonic() + timeout
    stable_since = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - stable_since < seconds:
        time.sleep(0.25)
        now = proc_status(pid)
        if now["fds"] < last["fds"] or now["threads"] < last["threads"]:
            stable_since = time.monotonic()
        last = now
    return last


if __name__ == "__main__":
    sys.exit(main())
