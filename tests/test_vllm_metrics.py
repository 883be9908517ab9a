"""The vLLM-named series that Kubernetes inference gateways route by (Gateway API Inference
Extension / llm-d endpoint picker): parsed with prometheus_client's own parser, under load, and
checked against the engine's state; then two real `loragate serve` processes behind a picker that
follows the published LoRA-affinity rule."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loragate.engine.async_engine import AsyncEngine
from loragate.engine.config import EngineConfig
from loragate.gateway import GatewaySettings, create_app
from loragate.testing import build_adapter, free_port
from tests.epp_scorer import LoraAffinityPicker, lora_affinity_score, parse_metrics
from tests.test_gateway import running_server, wait_for

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = ("a0", "a1", "a2", "a3")


@pytest.fixture(scope="module")
def adapter_root(checkpoints, tmp_path_factory):
    base = checkpoints("llama3")
    root = tmp_path_factory.mktemp("vllm-metrics-adapters")
    for i, name in enumerate(ADAPTERS):
        build_adapter(base, root / name, rank=4, alpha=8, targets=("q_proj", "v_proj"), seed=300 + i)
    return base, root


class FrozenSteps:
    """Stops the engine's forward steps on demand while its loop keeps taking commands (new
    requests, scrapes), so the state a scrape reports can be compared with the engine's own."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.inner = engine.engine.step
        self.frozen = threading.Event()
        self._pause = threading.Event()
        engine.engine.step = self.step

    def step(self):
        if self.frozen.is_set():
            self._pause.wait(0.01)  # a short idle step: the loop goes back to its command queue
            return []
        return self.inner()


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def stream(url: str, model: str, prompt: str, max_tokens: int, done: list) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=60) as h, h.stream("POST", url + "/v1/completions", json=body) as r:
        lines = [line for line in r.iter_lines() if line]
    done.append((model, r.status_code, lines[-1] if lines else ""))


def test_vllm_series_match_the_engine_under_load(adapter_root):
    base, root = adapter_root
    cfg = EngineConfig(model=str(base), served_model_name="tiny", device="cpu", dtype="float32",
                       adapter_dir=str(root), max_loras=2, max_lora_rank=8, max_num_seqs=2,
                       kv_cache_memory=8 << 20, block_size=8, max_model_len=256)
    engine = AsyncEngine(cfg)
    gate = FrozenSteps(engine)
    with running_server(create_app(engine, GatewaySettings())) as url:
        done: list = []
        threads = [threading.Thread(target=stream, args=(url, m, f"hello {m}", 200, done)) for m in ("a0", "a1")]
        for t in threads:
            t.start()
        wait_for(lambda: engine.stats().running == 2, timeout=30, what="a0 and a1 running")
        gate.frozen.set()  # both hold their slot (200 tokens each): nothing can be evicted now
        late = [threading.Thread(target=stream, args=(url, m, f"later {m}", 5, done)) for m in ("a2", "a3", "a0")]
        for t in late:
            t.start()
        threads += late
        wait_for(lambda: engine.stats().waiting == 3, timeout=30, what="three queued requests")
        assert engine.engine.adapters.wait_idle(30)

        fam = families(httpx.get(url + "/metrics").text)
        inner = engine.engine
        running = {s.request.adapter for s in inner.scheduler.running}
        assert running == {"a0", "a1"}
        sample = lambda name: fam[name].samples
        assert [(s.labels, s.value) for s in sample("vllm:num_requests_running")] == [({"model_name": "tiny"}, 2)]
        assert [(s.labels, s.value) for s in sample("vllm:num_requests_waiting")] == [({"model_name": "tiny"}, 3)]
        assert inner.scheduler.num_waiting == 3
        used, total = inner.kv.allocator.num_used, inner.kv.allocator.num_blocks
        assert used > 0
        assert sample("vllm:kv_cache_usage_perc")[0].value == pytest.approx(used / total)
        (info,) = sample("vllm:lora_requests_info")
        # a0 has a queued request too, but it is resident: only adapters still to load are "waiting"
        assert info.labels == {"running_lora_adapters": "a0,a1", "waiting_lora_adapters": "a2,a3",
                               "max_lora": str(inner.lora.max_loras)}
        assert info.labels["max_lora"] == "2"
        assert abs(info.value - time.time()) < 60
        (cache,) = sample("vllm:cache_config_info")
        assert cache.labels == {"block_size": "8", "num_gpu_blocks": str(total)} and cache.value == 1
        # loragate's own names are still there, beside the vLLM ones
        assert fam["loragate_num_requests_running"].samples[0].value == 2

        gate.frozen.clear()
        for t in threads:
            t.join(timeout=60)
        assert sorted(m for m, status, last in done if status == 200 and last == "data: [DONE]") == \
            ["a0", "a0", "a1", "a2", "a3"]
        wait_for(lambda: (s := engine.stats()).running == 0 and s.waiting == 0, what="engine idle")

        pod = parse_metrics(httpx.get(url + "/metrics").text)
        resident = {a.name for a in engine.list_adapters() if a.tier == "device"}
        assert (pod.running_requests, pod.waiting_queue, pod.kv_usage) == (0, 0, 0.0)
        assert pod.active == resident and len(resident) == 2 and pod.waiting_adapters == set()
        assert pod.lora_series == 1  # replaced on every scrape, never piling up old label sets
        stamp = lambda: families(httpx.get(url + "/metrics").text)["vllm:lora_requests_info"].samples
        (before,), (after,) = stamp(), stamp()
        assert after.value >= before.value  # the value is the time of the update


def test_lora_affinity_rule_cases():
    from tests.epp_scorer import PodMetrics

    pod = PodMetrics(0, 0, 0.0, {"a"}, {"w"}, 3, 16, 10, 1)
    assert lora_affinity_score(pod, "a") == 1.0
    assert lora_affinity_score(pod, "new") == 0.8  # 1 + 1 < 3
    full = PodMetrics(0, 0, 0.0, {"a", "b"}, {"w"}, 3, 16, 10, 1)
    assert lora_affinity_score(full, "w") == 0.6
    assert lora_affinity_score(full, "new") == 0.0


@pytest.fixture(scope="module")
def two_servers(adapter_root, tmp_path_factory):
    base, root = adapter_root
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    logs = tmp_path_factory.mktemp("two-servers")
    procs, urls = [], []
    for i in range(2):
        port = free_port()
        cmd = [sys.executable, "-m", "loragate.cli", "serve", "--model", str(base), "--served-model-name", "tiny",
               "--adapter-dir", str(root), "--device", "cpu", "--dtype", "float32", "--max-loras", "2",
               "--max-lora-rank", "8", "--kv-cache-memory", "8MiB", "--block-size", "8", "--max-model-len", "256",
               "--port", str(port), "--log-level", "warning"]
        with open(logs / f"server{i}.log", "wb") as out:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
        urls.append(f"http://127.0.0.1:{port}")
    try:
        for i, (proc, url) in enumerate(zip(procs, urls)):
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, (logs / f"server{i}.log").read_text()
                assert time.monotonic() < deadline, (logs / f"server{i}.log").read_text()
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_picker_sends_an_adapter_to_the_server_that_holds_it(two_servers):
    urls = two_servers
    with httpx.Client(timeout=60) as h:
        picker = LoraAffinityPicker(urls, h)

        def complete(i: int, model: str) -> None:
            r = h.post(urls[i] + "/v1/completions", json={"model": model, "prompt": "moon river", "max_tokens": 3,
                                                         "temperature": 0})
            assert r.status_code == 200, r.text

        def routed(model: str) -> int:
            i = picker.pick(model)
            complete(i, model)
            return i

        # cold: both servers have room (score 0.8 each); the tie-break picks the first
        first = routed("a0")
        assert first == 0
        pods = picker.scrape()
        assert pods[0].active == {"a0"} and pods[1].active == set()
        assert pods[0].max_active == 2 and pods[0].block_size == 8
        # from now on a0 goes where it is loaded (1.0 beats 0.8), every time
        assert [routed("a0") for _ in range(8)] == [0] * 8
        # an adapter loaded on the other server is routed there
        complete(1, "a1")
        assert [routed("a1") for _ in range(4)] == [1] * 4
        assert [routed("a0") for _ in range(4)] == [0] * 4
        # fill server 0's two slots: a new adapter can only score on server 1, which has room
        complete(0, "a2")
        pods = picker.scrape()
        assert pods[0].active == {"a0", "a2"} and pods[1].active == {"a1"}
        assert lora_affinity_score(pods[0], "a3") == 0.0 and lora_affinity_score(pods[1], "a3") == 0.8
        assert routed("a3") == 1
        assert picker.scrape()[1].active == {"a1", "a3"}
