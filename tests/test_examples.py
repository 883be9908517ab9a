"""The examples, run as a user would: each as a subprocess against a real `loragate serve` of the demo."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from loragate.demo.tasks import pig_latin, reverse, shout, title
from loragate.testing import free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
KEY = "sk-examples"



@pytest.fixture(scope="module")
def server(tmp_path_factory):
    adapter_root = tmp_path_factory.mktemp("adapters")
    log = tmp_path_factory.mktemp("log") / "server.log"
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "loragate.cli", "serve", "--port", str(port),
           "--allowed-adapter-dir", str(adapter_root), "--api-key", KEY]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"server exited early:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"server not healthy in 60 s:\n{log.read_text()}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        env.update(LORAGATE_BASE_URL=f"http://127.0.0.1:{port}/v1", LORAGATE_API_KEY=KEY)
        yield {"env": env, "adapter_root": adapter_root, "log": log, "url": f"http://127.0.0.1:{port}"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def run(server, *cmd: str) -> str:
    result = subprocess.run(cmd, cwd=ROOT, env=server["env"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def streamed(output: str, label: str) -> str:
    """The text of a streamed line, e.g. 'stream:  cat| |moon|' -> 'cat moon'."""
    line = next(l for l in output.splitlines() if l.startswith(label))
    return line.split(":", 1)[1].lstrip().replace("|", "")


def test_openai_sdk(server):
    out = run(server, sys.executable, str(EXAMPLES / "openai_sdk.py"))
    message = "Hello, how are you?"
    assert "models: loragate-demo, shout, reverse, title, pig-latin" in out
    assert f"shout: {shout(message)!r}" in out
    assert f"reverse: {reverse(message)!r}" in out
    assert streamed(out, "pig-latin, streamed") == pig_latin(message)


def test_langchain_chat(server):
    out = run(server, sys.executable, str(EXAMPLES / "langchain_chat.py"))
    message = "the quick brown fox, 3 lazy dogs!"
    assert f"invoke:  {title(message)!r}" in out
    assert streamed(out, "stream:") == title(message)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl(server):
    out = run(server, "bash", str(EXAMPLES / "curl.sh"))
    message = "moon river cat"
    answer = json.loads(out.splitlines()[1])
    assert answer["choices"][0]["message"]["content"] == shout(message)
    events = [l.removeprefix("data: ") for l in out.splitlines() if l.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"]["content"] or "" for e in events[:-1])
    assert text == reverse(message)


def test_prefix_caching(server):
    out = run(server, sys.executable, str(EXAMPLES / "prefix_caching.py"))
    rows = re.findall(r"(\S+) '([a-z ]+)': prompt_tokens=(\d+) cached_tokens=(\d+)", out)
    assert [(m, t) for m, t, _, _ in rows] == [("shout", "moon river cat"), ("shout", "cat moon river"),
                                                ("reverse", "cat moon river")], out
    (_, _, p1, c1), (_, _, p2, c2), (_, _, p3, c3) = [(m, t, int(p), int(c)) for m, t, p, c in rows]
    # the second shout request finds the system prompt's blocks (16 tokens each); reverse has other
    # weights and finds none of shout's, though its prompt is the second one's to the token
    assert c1 < c2 and c2 > 0 and c2 % 16 == 0 and c2 <= p2 - 1
    assert p3 == p2 and c3 == 0


def test_many_adapters(server):
    out = run(server, sys.executable, str(EXAMPLES / "many_adapters.py"),
              "--dir", str(server["adapter_root"]), "--count", "20", "--requests", "40", "--concurrency", "8")
    assert "registered 20/20 adapters" in out
    assert "40 answered, 0 failed" in out
    accuracy = float(re.search(r"accuracy ([\d.]+)%", out).group(1))
    assert accuracy >= 50, out
    assert len(list(server["adapter_root"].iterdir())) == 20


def test_startup_summary_and_health_name_the_dtype_and_why(server):
    """The demo checkpoint is bf16: served in bf16 where this CPU multiplies bf16 natively, else in
    float32; the start-up log and /health both say which and why."""
    import torch

    from loragate.engine import host

    expected = host.choose_dtype("auto", torch.bfloat16, "cpu", host.detect().features)
    health = httpx.get(server["url"] + "/health", timeout=10).json()
    assert health["status"] == "ok"
    assert (health["dtype"], health["dtype_reason"]) == (expected.name, expected.reason)
    assert health["vector_extensions"] == host.detect().features.extensions()
    assert f"compute dtype {expected.name} on cpu ({expected.reason})" in server["log"].read_text()


def labelled(output: str) -> dict[str, str]:
    """'label: value' lines of an example's output."""
    return dict(line.split(": ", 1) for line in output.splitlines() if ": " in line)


def test_structured_output(server):
    out = labelled(run(server, sys.executable, str(EXAMPLES / "structured_output.py")))
    for model in ("loragate-demo", "shout"):
        ticket = json.loads(out[model])
        assert set(ticket) == {"title", "priority", "urgent", "estimate_hours"}
        assert isinstance(ticket["title"], str) and len(ticket["title"]) <= 20
        assert ticket["priority"] in ("low", "medium", "high") and isinstance(ticket["urgent"], bool)
        assert isinstance(ticket["estimate_hours"], int) and 1 <= ticket["estimate_hours"] <= 40
    assert out["choice"] in ("cat", "moon", "river")
    assert re.fullmatch(r"[a-z]{1,8}-[0-9]{3}", out["regex"])


def test_langchain_tools(server):
    out = labelled(run(server, sys.executable, str(EXAMPLES / "langchain_tools.py")))
    name, args = out["tool call"].split(" ", 1)
    args = json.loads(args)
    assert name == "get_weather" and args["city"] in ("paris", "tokyo", "lima") and args["days"] in (1, 2, 3)
    assert out["tool result"] == f"sunny in {args['city']} for the next {args['days']} day(s)"
    assert "final answer" in out
    for method in ("function_calling", "json_schema"):
        forecast = json.loads(out[f"structured ({method})"])
        assert forecast["city"] in ("paris", "tokyo", "lima") and 1 <= forecast["days"] <= 3


def test_lorax_client(server):
    if not os.environ.get("CI"):  # installed with --no-deps (README, .ci/run); CI fails without it
        pytest.importorskip("lorax")
    out = run(server, sys.executable, str(EXAMPLES / "lorax_client.py"))
    message = "moon river cat"
    assert f"shout: {shout(message)!r} (eos_token," in out
    assert streamed(out, "reverse, streamed") == reverse(message)
    assert "shout+title merged: '" in out
