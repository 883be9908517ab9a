"""Gateway tests through a real uvicorn server and the real clients (openai SDK, LangChain, curl).

The engine comes from `make_engine`, the single factory to switch to the real AsyncEngine on a
tiny checkpoint; tests that need fault injection (dead engine, full queue, mid-stream failure)
use the fake's switches and are skipped for other engines.
"""
from __future__ import annotations

import asyncio
import json
import logging
import shutil
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from loragate.gateway import GatewaySettings, create_app
from tests.fake_engine import FakeEngine

ADMIN, KEY_A, KEY_B, KEY_NOBASE = "sk-admin-0", "sk-tenant-a", "sk-tenant-b", "sk-no-base"


def make_engine(adapters: dict[str, str]):
    """The engine under test; replace with the real AsyncEngine on a tiny checkpoint."""
    return FakeEngine(model_name="fake-base", max_model_len=256, adapters=adapters)


def wait_for(cond, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def running_server(app):
    """uvicorn on a free local port in a background thread; stopped with should_exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, what="server start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def make_adapter_dir(root: Path, name: str) -> str:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    return str(d)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    adapters = {"alpha": make_adapter_dir(root, "alpha"), "beta": make_adapter_dir(root, "beta")}
    engine = make_engine(adapters)
    settings = GatewaySettings(
        api_keys=(ADMIN,),
        api_keys_file={"keys": [
            {"key": KEY_A, "tenant": "acme", "adapters": ["alpha"]},
            {"key": KEY_B, "tenant": "globex", "adapters": ["beta"]},
            {"key": KEY_NOBASE, "tenant": "nobase", "adapters": "*", "base": False},
        ]},
        allowed_adapter_dirs=(str(root),),
    )
    with running_server(create_app(engine, settings)) as url:
        yield {"url": url, "engine": engine, "root": root}
    assert engine.shut_down  # lifespan stopped the engine


@pytest.fixture
def url(env):
    return env["url"]


@pytest.fixture
def engine(env):
    return env["engine"]


@pytest.fixture
def fake(engine):
    if not isinstance(engine, FakeEngine):
        pytest.skip("needs the fake engine's fault switches")
    return engine


@contextmanager
def switched(obj, **attrs):
    old = {k: getattr(obj, k) for k in attrs}
    for k, v in attrs.items():
        setattr(obj, k, v)
    try:
        yield obj
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


def client(url, key=ADMIN) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def aclient(url, key=ADMIN) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def assert_error_shape(resp: httpx.Response, status: int, code: str | None = None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if code is not None:
        assert err["code"] == code
    return err


# ---- completions ----------------------------------------------------------------------------

def test_completion_basic_usage_and_ids(url, engine):
    r = client(url).completions.create(model="fake-base", prompt="Hello there", max_tokens=40, seed=3)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == "fake-base"
    assert r.system_fingerprint
    assert len(r.choices) == 1 and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(engine.tokenizer.encode("Hello there"))
    assert 0 < r.usage.completion_tokens <= 40
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_max_tokens_gives_length(url):
    r = client(url).completions.create(model="fake-base", prompt="abc", max_tokens=2, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2


@pytest.mark.parametrize("prompt,count", [
    (["one", "two"], 2),
    ([5, 6, 7, 8], 1),
    ([[5, 6, 7], [9, 10]], 2),
])
def test_completion_prompt_forms(url, prompt, count):
    r = client(url).completions.create(model="fake-base", prompt=prompt, max_tokens=5, n=2, seed=1)
    assert sorted(c.index for c in r.choices) == list(range(count * 2))
    if isinstance(prompt[0], list):
        assert r.usage.prompt_tokens == sum(len(p) for p in prompt)
    elif isinstance(prompt[0], int):
        assert r.usage.prompt_tokens == len(prompt)


def test_completion_logprobs_and_echo(url):
    c = client(url)
    r = c.completions.create(model="fake-base", prompt="log me", max_tokens=6, logprobs=2, seed=0)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == len(lp.top_logprobs) == n
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert all(len(t) <= 2 for t in lp.top_logprobs) and all(v <= 0 for v in lp.token_logprobs)
    e = c.completions.create(model="fake-base", prompt="echo me", max_tokens=4, echo=True, seed=0)
    plain = c.completions.create(model="fake-base", prompt="echo me", max_tokens=4, seed=0)
    assert e.choices[0].text == "echo me" + plain.choices[0].text


def test_seed_reproducible_and_n_choices_differ(url):
    c = client(url)
    kw = dict(model="fake-base", messages=[{"role": "user", "content": "tell me"}], max_tokens=30,
              temperature=1.0, seed=42, n=3)
    a, b = c.chat.completions.create(**kw), c.chat.completions.create(**kw)
    texts_a = [ch.message.content for ch in sorted(a.choices, key=lambda x: x.index)]
    texts_b = [ch.message.content for ch in sorted(b.choices, key=lambda x: x.index)]
    assert texts_a == texts_b
    assert len(set(texts_a)) > 1
    one = c.chat.completions.create(**{**kw, "n": 1})
    assert one.choices[0].message.content == texts_a[0]
    assert a.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt is counted once for n choices
    singles = [c.chat.completions.create(**{**kw, "n": 1, "seed": 42 + i}) for i in range(3)]
    assert [s.choices[0].message.content for s in singles] == texts_a  # choice i used seed + i
    assert a.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)


# ---- chat -----------------------------------------------------------------------------------

def test_chat_basic_with_text_parts_and_tenant(url, engine):
    r = client(url, KEY_A).chat.completions.create(
        model="alpha",
        messages=[{"role": "developer", "content": "be brief"},
                  {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}],
        max_completion_tokens=20, seed=1, user="u1")
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "alpha"
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert r.usage.completion_tokens <= 20
    last = engine.requests[-1]
    assert last.adapter == "alpha" and last.tenant == "acme" and last.params.max_tokens == 20


def test_chat_adapter_changes_output_and_base_prefix_routing(url):
    c = client(url)
    msgs = [{"role": "user", "content": "same prompt"}]
    base = c.chat.completions.create(model="fake-base", messages=msgs, max_tokens=40, temperature=0)
    ad = c.chat.completions.create(model="alpha", messages=msgs, max_tokens=40, temperature=0)
    pref = c.chat.completions.create(model="fake-base:alpha", messages=msgs, max_tokens=40, temperature=0)
    assert pref.model == "fake-base:alpha"
    assert pref.choices[0].message.content == ad.choices[0].message.content
    assert base.choices[0].message.content != ad.choices[0].message.content


def test_chat_logprobs(url):
    r = client(url).chat.completions.create(model="fake-base", messages=[{"role": "user", "content": "x"}],
                                            max_tokens=5, logprobs=True, top_logprobs=2, seed=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and bytes(item.bytes).decode("utf-8", "replace") == item.token
        assert 1 <= len(item.top_logprobs) <= 2


async def test_async_sdk_chat_and_completion(url):
    c = aclient(url)
    r1, r2 = await asyncio.gather(
        c.chat.completions.create(model="beta", messages=[{"role": "user", "content": "a"}], max_tokens=8),
        c.completions.create(model="fake-base", prompt="b", max_tokens=8))
    assert r1.choices[0].message.role == "assistant" and r2.choices[0].text is not None
    await c.close()


# ---- streaming ------------------------------------------------------------------------------

def test_chat_stream_matches_non_stream_with_usage(url):
    c = client(url)
    kw = dict(model="alpha", messages=[{"role": "user", "content": "stream please"}], max_tokens=40, seed=7, n=2)
    full = c.chat.completions.create(**kw)
    chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert all(ch.id == chunks[0].id and ch.object == "chat.completion.chunk" for ch in chunks)
    texts, roles, finishes = {0: "", 1: ""}, {}, {}
    for ch in chunks[:-1]:
        assert ch.usage is None
        for choice in ch.choices:
            if choice.delta.role:
                assert choice.delta.content == "" and choice.index not in roles
                roles[choice.index] = choice.delta.role
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                assert choice.index not in finishes
                finishes[choice.index] = choice.finish_reason
    assert roles == {0: "assistant", 1: "assistant"}
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    for choice in full.choices:
        assert texts[choice.index] == choice.message.content
        assert finishes[choice.index] == choice.finish_reason


async def test_async_completion_stream(url):
    c = aclient(url)
    full = await c.completions.create(model="fake-base", prompt="go", max_tokens=30, seed=5)
    stream = await c.completions.create(model="fake-base", prompt="go", max_tokens=30, seed=5, stream=True,
                                        stream_options={"include_usage": True})
    text, usage = "", None
    async for ch in stream:
        if ch.usage:
            usage = ch.usage
        for choice in ch.choices:
            text += choice.text
    assert text == full.choices[0].text and usage == full.usage
    await c.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_raw_sse_framing(url):
    body = json.dumps({"model": "fake-base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10,
                       "stream": True, "stream_options": {"include_usage": True}})
    out = subprocess.run(["curl", "-sN", url + "/v1/chat/completions", "-H", "Content-Type: application/json",
                          "-H", f"Authorization: Bearer {ADMIN}", "-d", body],
                         capture_output=True, timeout=30, check=True).stdout.decode()
    assert out.endswith("data: [DONE]\n\n") and "\r" not in out
    events = out.split("\n\n")[:-1]
    assert len(events) >= 4 and all(e.startswith("data: ") and "\n" not in e for e in events)
    payloads = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["total_tokens"] > 0


def test_stream_mid_error_event_then_done(url, fake):
    body = {"model": "fake-base", "prompt": "x", "max_tokens": 50, "stream": True}
    with switched(fake, fail_after=2):
        with httpx.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {ADMIN}"},
                          timeout=30) as resp:
            assert resp.status_code == 200
            events = [line for line in resp.iter_lines() if line]
        with pytest.raises(openai.APIError):
            for _ in client(url).completions.create(model="fake-base", prompt="x", max_tokens=50, stream=True):
                pass
    assert events[-1] == "data: [DONE]"
    err = json.loads(events[-2][len("data: "):])["error"]
    assert set(err) == {"message", "type", "param", "code"}


def test_client_disconnect_aborts_engine_request(url, fake):
    body = {"model": "beta", "messages": [{"role": "user", "content": "long"}], "max_tokens": 200,
            "ignore_eos": True, "stream": True}
    before = len(fake.aborted)
    with switched(fake, token_delay=0.02):
        with httpx.stream("POST", url + "/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30) as resp:
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(3)]
            assert any(line.startswith("data: ") for line in got)
        wait_for(lambda: len(fake.aborted) > before, what="engine abort")
        wait_for(lambda: 'status="aborted"' in httpx.get(url + "/metrics").text, what="aborted metric")
    assert not fake.running or wait_for(lambda: not fake.running, what="no running requests")


# ---- errors ---------------------------------------------------------------------------------

def test_bad_json_and_schema_are_400(url):
    h = {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"}
    assert_error_shape(httpx.post(url + "/v1/chat/completions", content=b"{not json", headers=h), 400)
    err = assert_error_shape(httpx.post(url + "/v1/completions", json={"model": "fake-base"}, headers=h), 400)
    assert err["param"] == "prompt"
    c = client(url)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="fake-base", messages=[{"role": "user", "content": "x"}], temperature=5)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="fake-base", messages=[{"role": "user", "content": "x"}], n=0)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="fake-base", prompt="x", logit_bias={"abc": 1})


def test_unknown_fields_are_ignored(url):
    r = client(url).chat.completions.create(model="fake-base", messages=[{"role": "user", "content": "x"}],
                                            max_tokens=3, extra_body={"some_vendor_field": {"a": 1}, "top_k": 5,
                                                                      "min_p": 0.1, "repetition_penalty": 1.1})
    assert r.choices[0].finish_reason in ("stop", "length")


def test_context_overflow_is_400(url, engine):
    with pytest.raises(openai.BadRequestError) as ei:
        client(url).completions.create(model="fake-base", prompt="x" * 20, max_tokens=engine.max_model_len)
    assert ei.value.code == "context_length_exceeded"


@pytest.mark.parametrize("extra,param", [
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
])
def test_unsupported_chat_fields_are_400(url, extra, param):
    with pytest.raises(openai.BadRequestError) as ei:
        client(url).chat.completions.create(model="fake-base", messages=[{"role": "user", "content": "x"}],
                                            extra_body=extra)
    assert ei.value.param == param and "not supported" in ei.value.message


def test_unsupported_content_and_best_of_are_400(url):
    c = client(url)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="fake-base", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    with pytest.raises(openai.BadRequestError) as ei:
        c.completions.create(model="fake-base", prompt="x", best_of=3, n=1)
    assert ei.value.param == "best_of"


def test_auth_errors(url):
    with pytest.raises(openai.AuthenticationError) as ei:
        client(url, "sk-wrong").models.list()
    assert ei.value.code == "invalid_api_key"
    r = httpx.post(url + "/v1/chat/completions", content=b"{bad")  # auth before body parsing
    assert_error_shape(r, 401, "invalid_api_key")


def test_unknown_model_is_404_before_engine_work(url, engine):
    before = len(engine.requests)
    with pytest.raises(openai.NotFoundError) as ei:
        client(url).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert ei.value.code == "model_not_found" and ei.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client(url).completions.create(model="other-base:alpha", prompt="x")
    assert len(engine.requests) == before


def test_queue_full_is_429_with_retry_after(url, fake):
    with switched(fake, queue_full=True):
        with pytest.raises(openai.RateLimitError):
            client(url).completions.create(model="fake-base", prompt="x")
        r = httpx.post(url + "/v1/completions", json={"model": "fake-base", "prompt": "x"},
                       headers={"Authorization": f"Bearer {ADMIN}"})
    assert_error_shape(r, 429, "rate_limit_exceeded")
    assert int(r.headers["retry-after"]) >= 1


def test_dead_engine_is_503_and_health(url, fake):
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    with switched(fake, dead=True):
        assert httpx.get(url + "/health").status_code == 503
        with pytest.raises(openai.InternalServerError) as ei:
            client(url).chat.completions.create(model="fake-base", messages=[{"role": "user", "content": "x"}])
        assert ei.value.status_code == 503
    assert httpx.get(url + "/health").status_code == 200


def test_unexpected_exception_is_500_and_server_survives(url, engine, monkeypatch):
    def boom(request):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(engine, "generate", boom)
    with pytest.raises(openai.InternalServerError) as ei:
        client(url).completions.create(model="fake-base", prompt="x")
    assert ei.value.status_code == 500 and "secret" not in ei.value.message
    monkeypatch.undo()
    assert client(url).completions.create(model="fake-base", prompt="x", max_tokens=2).choices


def test_unknown_route_and_method(url):
    assert_error_shape(httpx.get(url + "/v1/nothing-here"), 404)
    assert_error_shape(httpx.get(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {ADMIN}"}), 405)


# ---- models, keys, adapters -----------------------------------------------------------------

def test_models_list_and_retrieve(url):
    c = client(url)
    models = {m.id: m for m in c.models.list().data}
    assert set(models) == {"fake-base", "alpha", "beta"}
    assert models["alpha"].owned_by == "loragate" and models["alpha"].model_extra["parent"] == "fake-base"
    assert c.models.retrieve("beta").id == "beta"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gamma")


def test_per_key_isolation(url):
    a = client(url, KEY_A)
    assert {m.id for m in a.models.list().data} == {"fake-base", "alpha"}
    with pytest.raises(openai.NotFoundError) as ei:
        a.chat.completions.create(model="beta", messages=[{"role": "user", "content": "x"}])
    assert ei.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        a.models.retrieve("beta")
    nobase = client(url, KEY_NOBASE)
    assert {m.id for m in nobase.models.list().data} == {"alpha", "beta"}
    with pytest.raises(openai.NotFoundError):
        nobase.completions.create(model="fake-base", prompt="x")
    r = httpx.post(url + "/v1/adapters", json={"name": "z", "path": "/tmp"}, headers={"Authorization": f"Bearer {KEY_A}"})
    assert_error_shape(r, 403)
    with pytest.raises(openai.PermissionDeniedError):
        a.get("/adapters", cast_to=object)


def test_admin_registers_and_deletes_adapter(url, env, tmp_path):
    h = {"Authorization": f"Bearer {ADMIN}"}
    path = make_adapter_dir(env["root"], "gamma")
    r = httpx.post(url + "/v1/adapters", json={"name": "gamma", "path": path}, headers=h)
    assert r.status_code == 200, r.text
    listed = httpx.get(url + "/v1/adapters", headers=h).json()["data"]
    assert {"gamma", "alpha"} <= {a["id"] for a in listed}
    assert all({"tier", "size_bytes", "requests_served"} <= set(a) for a in listed)
    assert client(url).completions.create(model="gamma", prompt="x", max_tokens=2).choices
    outside = make_adapter_dir(tmp_path, "evil")
    assert_error_shape(httpx.post(url + "/v1/adapters", json={"name": "evil", "path": outside}, headers=h), 403)
    assert_error_shape(httpx.post(url + "/v1/adapters", json={"name": "g2", "path": path + "/../../.."},
                                  headers=h), 403)
    assert httpx.delete(url + "/v1/adapters/gamma", headers=h).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client(url).completions.create(model="gamma", prompt="x")
    assert_error_shape(httpx.delete(url + "/v1/adapters/gamma", headers=h), 404, "model_not_found")


def test_metrics_exposed(url):
    client(url).completions.create(model="alpha", prompt="m", max_tokens=3)
    text = httpx.get(url + "/metrics").text
    for name in ("loragate_requests_total", "loragate_time_to_first_token_seconds_bucket",
                 "loragate_inter_token_latency_seconds", "loragate_e2e_request_latency_seconds",
                 "loragate_queue_time_seconds", "loragate_num_requests_running", "loragate_num_requests_waiting",
                 "loragate_kv_cache_usage_ratio", "loragate_prompt_tokens_total", "loragate_generation_tokens_total",
                 "loragate_adapter_requests_total", "loragate_adapter_tier", "loragate_adapter_load_seconds"):
        assert name in text, name
    assert 'loragate_requests_total{model="alpha",status="200"}' in text
    assert 'loragate_adapter_tier{adapter="alpha",tier="cpu"} 1.0' in text


def test_one_log_line_per_request_without_key(url, caplog):
    caplog.set_level(logging.INFO, logger="loragate.gateway")
    r = httpx.post(url + "/v1/completions", json={"model": "alpha", "prompt": "log", "max_tokens": 3},
                   headers={"Authorization": f"Bearer {KEY_A}"})
    rid = r.headers["x-request-id"]
    assert r.json()["id"] == f"cmpl-{rid}"
    lines = wait_for(lambda: [rec.getMessage() for rec in caplog.records if rid in rec.getMessage()],
                     what="request log line")
    assert len(lines) == 1
    line = lines[0]
    assert "model=alpha" in line and "status=200" in line and "latency=" in line
    assert f"completion_tokens={r.json()['usage']['completion_tokens']}" in line and KEY_A not in line


# ---- LangChain ------------------------------------------------------------------------------

def test_langchain_invoke_stream_batch(url):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="alpha", base_url=url + "/v1", api_key=ADMIN, max_tokens=20, seed=9, max_retries=0)
    msg = llm.invoke("hello")
    assert isinstance(msg.content, str) and msg.usage_metadata["output_tokens"] > 0
    streamed = None
    for part in ChatOpenAI(model="alpha", base_url=url + "/v1", api_key=ADMIN, max_tokens=20, seed=9,
                           stream_usage=True, max_retries=0).stream("hello"):
        streamed = part if streamed is None else streamed + part
    assert streamed.content == msg.content
    assert streamed.usage_metadata["total_tokens"] == msg.usage_metadata["total_tokens"]
    outs = llm.batch(["a", "b", "c"])
    assert len(outs) == 3 and all(isinstance(o.content, str) for o in outs)


async def test_delete_waits_for_running_requests(url, env, fake):
    h = {"Authorization": f"Bearer {ADMIN}"}
    path = make_adapter_dir(env["root"], "delta")
    assert httpx.post(url + "/v1/adapters", json={"name": "delta", "path": path}, headers=h).status_code == 200
    body = {"model": "delta", "prompt": "slow", "max_tokens": 15, "ignore_eos": True, "stream": True}
    with switched(fake, token_delay=0.02):
        async with httpx.AsyncClient(base_url=url, headers=h, timeout=30) as http:
            async with http.stream("POST", "/v1/completions", json=body) as resp:
                lines = resp.aiter_lines()
                first = await anext(lines)
                assert first.startswith("data: ")
                delete = asyncio.create_task(http.delete("/v1/adapters/delta"))
                rest = [line async for line in lines if line]
            assert (await delete).status_code == 200
    finishes = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in rest[:-1]]
    assert rest[-1] == "data: [DONE]" and finishes[-1] == "length"  # the running request ran to the end
    assert not fake.has_adapter("delta")


def test_open_server_without_keys(tmp_path):
    engine = make_engine({"solo": make_adapter_dir(tmp_path, "solo")})
    with running_server(create_app(engine, GatewaySettings())) as open_url:
        c = openai.OpenAI(base_url=open_url + "/v1", api_key="anything", max_retries=0)
        assert {m.id for m in c.models.list().data} == {"fake-base", "solo"}
        assert c.completions.create(model="solo", prompt="x", max_tokens=2).choices
        assert httpx.get(open_url + "/v1/models").status_code == 200  # no Authorization header at all


def test_gateway_concurrency_limit_is_429(tmp_path):
    engine = make_engine({})
    settings = GatewaySettings(max_concurrent_requests=1, retry_after_seconds=3)
    with running_server(create_app(engine, settings)) as lim_url:
        r = httpx.post(lim_url + "/v1/completions", json={"model": "fake-base", "prompt": "x", "n": 2})
        assert_error_shape(r, 429, "rate_limit_exceeded")
        assert r.headers["retry-after"] == "3"
        ok = httpx.post(lim_url + "/v1/completions", json={"model": "fake-base", "prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200
