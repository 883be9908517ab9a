"""A request whose client is gone is aborted and its KV blocks and adapter slot freed within one
engine step: streams that lose their reader, and non-streaming requests whose client times out
while they still wait in the queue (before any token exists to send)."""
from __future__ import annotations

import threading
import time

import httpx
import pytest

from loragate.engine.async_engine import AsyncEngine
from loragate.engine.config import EngineConfig
from loragate.gateway import GatewaySettings, create_app
from loragate.testing import build_adapter
from tests.test_gateway import running_server, wait_for

STEP_SECONDS = 0.02  # steps are paced so that "within one step" is measurable on any machine


@pytest.fixture(scope="module")
def env(checkpoints, tmp_path_factory):
    base = checkpoints("llama3")
    root = tmp_path_factory.mktemp("gone-adapters")
    build_adapter(base, root / "a1", rank=4, alpha=8, seed=11)
    cfg = EngineConfig(model=str(base), served_model_name="tiny", dtype="float32", device="cpu",
                       adapter_dir=str(root), max_loras=2, max_lora_rank=8, kv_cache_memory=16 << 20,
                       block_size=8, max_num_seqs=1, max_model_len=512)
    engine = AsyncEngine(cfg)
    inner = engine.engine
    aborts: list[tuple[str, int, int]] = []  # (request id, step count, KV blocks used after the abort)
    real_step, real_abort = inner.step, inner.abort

    def paced_step():
        time.sleep(STEP_SECONDS)
        return real_step()

    def recording_abort(request_id):
        out = real_abort(request_id)
        aborts.append((request_id, inner.num_steps, inner.kv.allocator.num_used))
        return out

    inner.step, inner.abort = paced_step, recording_abort
    with running_server(create_app(engine, GatewaySettings())) as url:
        yield {"url": url, "engine": engine, "aborts": aborts}


def test_stream_reader_gone_frees_kv_within_a_step(env):
    url, engine, aborts = env["url"], env["engine"], env["aborts"]
    body = {"model": "a1", "prompt": "tell me a long story", "max_tokens": 400, "ignore_eos": True,
            "stream": True, "temperature": 0}
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(5):
                next(lines)
            assert engine.stats().kv_blocks_used > 0
            steps_at_close = engine.engine.num_steps
        # leaving the block closed the connection
    wait_for(lambda: aborts, timeout=10, what="the abort")
    _, steps_at_abort, kv_after = aborts.pop()
    assert steps_at_abort - steps_at_close <= 1
    assert kv_after == 0
    wait_for(lambda: engine.stats().running == 0, timeout=5, what="running back to 0")


def test_queued_request_of_a_gone_client_is_aborted_before_admission(env):
    url, engine, aborts = env["url"], env["engine"], env["aborts"]
    hog = {"model": "tiny", "prompt": "occupy the only slot", "max_tokens": 150, "ignore_eos": True}
    done: dict = {}
    t = threading.Thread(target=lambda: done.setdefault("r", httpx.post(url + "/v1/completions", json=hog,
                                                                         timeout=60)), daemon=True)
    t.start()
    wait_for(lambda: engine.stats().running == 1, timeout=10, what="the hog to run")
    queued = {"model": "a1", "prompt": "wait behind it", "max_tokens": 5}
    with pytest.raises(httpx.ReadTimeout):  # max_num_seqs=1: this one waits in the queue
        httpx.post(url + "/v1/completions", json=queued, timeout=httpx.Timeout(30, read=0.5))
    wait_for(lambda: aborts, timeout=10, what="the queued request's abort")
    rid, _, _ = aborts.pop()
    assert "r" not in done  # aborted while the hog still ran, i.e. before it could be admitted
    wait_for(lambda: engine.stats().waiting == 0, timeout=2, what="the queue to empty")
    t.join(timeout=60)
    assert done["r"].status_code == 200 and done["r"].json()["usage"]["completion_tokens"] == 150
    assert not rid.startswith(done["r"].json()["id"])  # the aborted one was the queued request
