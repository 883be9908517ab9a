"""Graceful shutdown of a real `loragate serve` process: SIGTERM turns /health 503 at once and
refuses new inference with 503, lets in-flight requests finish, ends the ones that outlive
--shutdown-timeout with an error event and [DONE], stops the adapter loader and exits 0."""
from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import httpx
import pytest

from loragate.testing import ServeProcess, build_adapter
from tests.test_gateway import wait_for

REPO = Path(__file__).resolve().parents[1]
SHUTDOWN_TIMEOUT = 6.0


@pytest.mark.slow
def test_sigterm_drains_then_exits_zero(checkpoints, tmp_path):
    base = checkpoints("llama3")
    build_adapter(base, tmp_path / "adapters" / "shouty", rank=4, alpha=8, seed=3)
    server = ServeProcess(["--model", str(base), "--served-model-name", "tiny", "--device", "cpu",
                           "--dtype", "float32", "--adapter-dir", str(tmp_path / "adapters"),
                           "--max-model-len", "65536", "--kv-cache-memory", "64MiB",
                           "--shutdown-timeout", str(SHUTDOWN_TIMEOUT)], tmp_path / "server.log", cwd=REPO)
    with server:
        url = server.url
        long_lines: list[str] = []
        short: dict = {}

        def long_stream() -> None:  # far longer than the shutdown timeout
            body = {"model": "shouty", "prompt": "the quick brown fox", "max_tokens": 60000, "temperature": 0,
                    "ignore_eos": True, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line:
                        long_lines.append(line)

        def short_request() -> None:  # in flight at SIGTERM, done well within the timeout
            body = {"model": "tiny", "prompt": "hello world", "max_tokens": 300, "temperature": 0,
                    "ignore_eos": True}
            short["response"] = httpx.post(url + "/v1/completions", json=body, timeout=120)

        t_long = threading.Thread(target=long_stream, daemon=True)
        t_long.start()
        wait_for(lambda: len(long_lines) >= 2, timeout=60, what="the long stream's first tokens")
        t_short = threading.Thread(target=short_request, daemon=True)
        t_short.start()
        wait_for(lambda: "loragate_num_requests_running 2.0" in httpx.get(url + "/metrics").text,
                 timeout=60, what="both requests running")
        server.proc.send_signal(signal.SIGTERM)
        health = wait_for(lambda: (r := httpx.get(url + "/health", timeout=5)).status_code == 503 and r,
                          timeout=5, what="/health to turn 503")
        assert health.json()["status"] == "draining"
        refused = httpx.post(url + "/v1/chat/completions", timeout=10,
                             json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == "server_shutting_down"

        t_short.join(timeout=60)
        r = short["response"]
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] == "length"
        assert r.json()["usage"]["completion_tokens"] == 300

        code = server.proc.wait(timeout=SHUTDOWN_TIMEOUT + 60)
        t_long.join(timeout=30)
        assert code == 0, server.log()[-3000:]
    assert long_lines[-1] == "data: [DONE]"
    err = json.loads(long_lines[-2][len("data: "):])["error"]
    assert err["code"] == "server_shutting_down"
    assert all(line.startswith("data: {\"id\"") for line in long_lines[:-2])  # tokens until the deadline
    log = server.log()
    assert "draining: 2 request(s) in flight" in log
    assert "ending 1 request(s) still in flight" in log
    assert "adapter loader stopped" in log and "step loop joined" in log
