"""Limits, each with its status and a clear message: body size (413), JSON nesting and array length
(400, checked before the body is parsed), unencodable strings (400), the waiting bound (503 +
Retry-After), per-key max_concurrent and tokens_per_minute (429 + Retry-After), a slow reader
(aborted, its engine request freed), admin routes and metrics for non-admin keys (bare 403)."""
from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest

from loragate.gateway import GatewaySettings, create_app
from loragate.gateway import limits as limits_module
from loragate.gateway.auth import Principal
from loragate.gateway.errors import APIError
from loragate.gateway.quotas import KeyQuotas
from tests.fake_engine import FakeEngine
from tests.test_gateway import assert_error_shape, make_adapter_dir, running_server, wait_for

ADMIN, TENANT, LIMITED, TPM = "sk-limits-admin", "sk-limits-tenant", "sk-limits-one", "sk-limits-tpm"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("limit-adapters")
    engine = FakeEngine(model_name="fake-base", max_model_len=10_000_000,
                        adapters={"alpha": make_adapter_dir(root, "alpha")})
    settings = GatewaySettings(
        api_keys=(ADMIN,),
        api_keys_file={"keys": [
            {"key": TENANT, "tenant": "t", "adapters": ["alpha"]},
            {"key": LIMITED, "tenant": "one", "adapters": "*", "max_concurrent": 1},
            {"key": TPM, "tenant": "tpm", "adapters": "*", "tokens_per_minute": 60},
        ]},
        allowed_adapter_dirs=(str(root),), max_request_bytes=20_000, max_json_depth=16, max_json_items=1500,
        max_waiting=2, max_stream_buffer=8, max_choices=16, metrics_auth="admin",
    )
    app = create_app(engine, settings)
    with running_server(app) as url:
        yield {"url": url, "engine": engine, "ctx": app.state.ctx, "root": root}


def post(url: str, path: str, body=None, key: str = ADMIN, **kw) -> httpx.Response:
    return httpx.post(url + path, json=body, headers={"Authorization": f"Bearer {key}", **kw.pop("headers", {})},
                      timeout=30, **kw)


def completion(**kw) -> dict:
    return {"model": "fake-base", "prompt": "hi", "max_tokens": 3, **kw}


# ---- body shape -------------------------------------------------------------------------------

def test_body_over_the_size_limit_is_413(env):
    url = env["url"]
    big = completion(prompt="x" * 30_000)
    assert_error_shape(post(url, "/v1/completions", big), 413, "request_too_large")

    def chunked():  # no Content-Length: counted as it arrives
        data = json.dumps(big).encode()
        for i in range(0, len(data), 4096):
            yield data[i:i + 4096]

    r = httpx.post(url + "/v1/completions", content=chunked(), headers={"Authorization": f"Bearer {ADMIN}"})
    assert_error_shape(r, 413, "request_too_large")
    assert post(url, "/v1/completions", completion()).status_code == 200


def test_deep_nesting_is_refused_before_parsing(env, monkeypatch):
    decoded = []
    real_loads = json.loads
    monkeypatch.setattr(limits_module, "json", type("J", (), {
        "loads": staticmethod(lambda raw: decoded.append(1) or real_loads(raw)),
        "JSONDecodeError": json.JSONDecodeError}))
    raw = '{"model": "fake-base", "prompt": "hi", "extra": ' + "[" * 5000 + "]" * 5000 + "}"
    r = httpx.post(env["url"] + "/v1/completions", content=raw, headers={"Authorization": f"Bearer {ADMIN}"})
    assert_error_shape(r, 400, "json_too_deep")
    assert decoded == []  # refused on the raw text, the decoder never ran
    brackets_in_strings = completion(prompt="[[[[" * 100 + "{{{{" * 100)
    assert post(env["url"], "/v1/completions", brackets_in_strings).status_code == 200
    assert decoded


def test_huge_arrays_are_400(env):
    r = post(env["url"], "/v1/completions", completion(prompt=[5] * 2000))
    assert_error_shape(r, 400, "json_too_large")
    r = post(env["url"], "/v1/completions", completion(logit_bias={str(i): 1 for i in range(1600)}))
    assert_error_shape(r, 400, "json_too_large")


def test_lone_surrogates_and_nul_bytes(env):
    url = env["url"]
    raw = b'{"model": "fake-base", "messages": [{"role": "user", "content": "bad \\ud800 text"}]}'
    r = httpx.post(url + "/v1/chat/completions", content=raw, headers={"Authorization": f"Bearer {ADMIN}"})
    err = assert_error_shape(r, 400, "invalid_unicode")
    assert err["param"] == "messages[0].content"
    raw = b'{"model": "\\udfff", "prompt": "x"}'
    r = httpx.post(url + "/v1/completions", content=raw, headers={"Authorization": f"Bearer {ADMIN}"})
    assert_error_shape(r, 400, "invalid_unicode")
    paired = b'{"model": "fake-base", "prompt": "emoji \\ud83d\\ude00 ok", "max_tokens": 2}'
    assert httpx.post(url + "/v1/completions", content=paired,
                      headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
    assert post(url, "/v1/completions", completion(prompt="nul \x00 byte")).status_code == 200
    assert_error_shape(post(url, "/v1/completions", completion(model="fake\x00base")), 404, "model_not_found")
    r = post(url, "/v1/adapters", {"name": "nul", "path": str(env["root"]) + "/a\x00b"})
    assert_error_shape(r, 400, "invalid_path")


def test_too_many_choices_is_400(env, monkeypatch):
    r = post(env["url"], "/v1/completions", completion(prompt=["a", "b", "c"], n=6))
    assert_error_shape(r, 400, "too_many_choices")
    encoded = []
    tok = env["engine"].tokenizer
    monkeypatch.setattr(tok, "encode", lambda *a, **k: encoded.append(1) or [5])
    r = post(env["url"], "/v1/completions", completion(prompt=["p"] * 17))
    assert_error_shape(r, 400, "too_many_choices")
    assert encoded == []  # refused before tokenizing thousands of prompts


# ---- load limits ------------------------------------------------------------------------------

async def test_waiting_bound_is_503_with_retry_after(env):
    url, ctx, fake = env["url"], env["ctx"], env["engine"]
    fake.token_delay = 0.5  # every request waits half a second for its first token
    try:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30) as h:
            first = asyncio.create_task(h.post("/v1/completions", json=completion(n=2)))
            while ctx.waiting < 2:  # bounded by the 30 s client timeout of `first`
                assert not first.done(), first.result().text
                await asyncio.sleep(0.005)
            r = await h.post("/v1/completions", json=completion())
            assert_error_shape(r, 503, "server_overloaded")
            assert r.headers["retry-after"] == "1"
            assert (await first).status_code == 200
    finally:
        fake.token_delay = 0.0
    assert ctx.waiting == 0
    assert post(url, "/v1/completions", completion()).status_code == 200


async def test_key_max_concurrent_is_429(env):
    url, fake = env["url"], env["engine"]
    fake.token_delay = 0.05
    try:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {LIMITED}"}, timeout=30) as h:
            body = completion(max_tokens=40, ignore_eos=True, stream=True)
            async with h.stream("POST", "/v1/completions", json=body) as held:
                assert held.status_code == 200
                r = await h.post("/v1/completions", json=completion())
                err = assert_error_shape(r, 429, "rate_limit_exceeded")
                assert "max_concurrent=1" in err["message"] and LIMITED not in r.text
                assert int(r.headers["retry-after"]) >= 1
                other = await h.post("/v1/completions", json=completion(),
                                     headers={"Authorization": f"Bearer {TENANT}"})
                assert other.status_code == 200  # another key is not limited by this one
                _ = [line async for line in held.aiter_lines()]
            assert (await h.post("/v1/completions", json=completion())).status_code == 200
    finally:
        fake.token_delay = 0.0


def test_key_tokens_per_minute_is_429(env):
    url = env["url"]
    assert post(url, "/v1/completions", completion(prompt="p" * 70), key=TPM).status_code == 200
    r = post(url, "/v1/completions", completion(), key=TPM)
    err = assert_error_shape(r, 429, "rate_limit_exceeded")
    assert "60 tokens per minute" in err["message"]
    assert int(r.headers["retry-after"]) >= 10  # 70+ tokens over budget at 1 token/s
    assert post(url, "/v1/completions", completion(), key=ADMIN).status_code == 200


def test_token_bucket_refills():
    now = [0.0]
    q = KeyQuotas(clock=lambda: now[0])
    p = Principal("t", None, key_id="k", tokens_per_minute=120)  # 2 tokens per second
    assert q.admit(p, 100)
    q.release(p, 50)  # 120 - 150 = -30
    with pytest.raises(APIError) as e:
        q.admit(p, 1)
    assert e.value.status == 429 and e.value.headers["Retry-After"] == "16"  # (1 + 30) / 2 s
    now[0] = 15.0
    with pytest.raises(APIError):
        q.admit(p, 1)
    now[0] = 16.0
    assert q.admit(p, 1)
    free = Principal("u", None, key_id="u")
    assert q.admit(free, 10**9) is False  # keys without limits are not tracked


def test_slow_reader_is_aborted(env):
    """A client that never reads a long stream: once the socket buffers are full and the response
    has been stuck for a while, the request is aborted instead of buffering without bound."""
    url, fake = env["url"], env["engine"]
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(completion(prompt="slow", max_tokens=8_000_000, ignore_eos=True, stream=True)).encode()
    before = len(fake.aborted)
    fake.chunk_tokens = 20_000  # ~20 KB per event: the socket buffers (a few MB) fill after a few hundred
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + ADMIN.encode() + b"\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_for(lambda: len(fake.aborted) > before, timeout=60, what="the unread stream to be aborted")
        assert not fake.running
    finally:
        fake.chunk_tokens = 1
        sock.close()
    assert post(url, "/v1/completions", completion()).status_code == 200


# ---- admin routes and metrics ------------------------------------------------------------------

def test_admin_routes_are_a_bare_403_for_other_keys(env):
    url = env["url"]
    h = {"Authorization": f"Bearer {TENANT}"}
    answers = [httpx.get(url + "/v1/adapters", headers=h),
               httpx.post(url + "/v1/adapters", json={"name": "x", "path": str(env["root"])}, headers=h),
               httpx.delete(url + "/v1/adapters/alpha", headers=h),
               httpx.delete(url + "/v1/adapters/no-such-adapter", headers=h),
               httpx.get(url + "/metrics", headers=h)]
    bodies = set()
    for r in answers:
        err = assert_error_shape(r, 403, "forbidden")
        assert err["param"] is None and err["type"] == "permission_error"
        bodies.add(r.text)
    assert len(bodies) == 1  # nothing tells an existing adapter from a missing one


def test_metrics_auth_admin(env):
    url = env["url"]
    assert_error_shape(httpx.get(url + "/metrics"), 401, "invalid_api_key")
    r = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200 and "loragate_num_requests_running" in r.text


def test_metrics_open_by_default(tmp_path):
    with running_server(create_app(FakeEngine(), GatewaySettings(api_keys=("sk-k",)))) as url:
        assert httpx.get(url + "/metrics").status_code == 200


def test_keys_file_errors_never_quote_keys():
    from loragate.gateway.auth import KeyStore

    with pytest.raises(ValueError) as e:
        KeyStore.build((), {"keys": [{"key": "sk-do-not-print", "max_concurrent": 0}]})
    assert "sk-do-not-print" not in str(e.value) and "max_concurrent" in str(e.value)
    with pytest.raises(ValueError) as e:
        KeyStore.build((), {"keys": [{"key": "sk-do-not-print", "unknown": 1}]})
    assert "sk-do-not-print" not in str(e.value)


def test_started_request_waits_no_longer_than_its_client(env):
    """A client that gives up while its request still waits for its first token: the request is
    aborted then, not when it would have been admitted."""
    url, fake, ctx = env["url"], env["engine"], env["ctx"]
    before = len(fake.aborted)
    fake.token_delay = 5.0
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=completion(), timeout=httpx.Timeout(10, read=0.3),
                       headers={"Authorization": f"Bearer {ADMIN}"})
        t0 = time.monotonic()
        wait_for(lambda: len(fake.aborted) > before, timeout=4, what="the waiting request to be aborted")
        assert time.monotonic() - t0 < 4  # long before its first token (5 s)
        wait_for(lambda: ctx.waiting == 0 and ctx.inflight == 0, timeout=5, what="counters back to zero")
    finally:
        fake.token_delay = 0.0


def test_deleted_adapter_leaves_no_metric_series(env):
    url, h = env["url"], {"Authorization": f"Bearer {ADMIN}"}
    path = make_adapter_dir(env["root"], "churned-7")
    assert httpx.post(url + "/v1/adapters", json={"name": "churned-7", "path": path}, headers=h).status_code == 200
    assert post(url, "/v1/completions", completion(model="churned-7")).status_code == 200
    assert 'model="churned-7"' in httpx.get(url + "/metrics", headers=h).text
    assert httpx.delete(url + "/v1/adapters/churned-7", headers=h).status_code == 200
    assert "churned-7" not in httpx.get(url + "/metrics", headers=h).text


def test_cli_flags_reach_gateway_settings(tmp_path):
    from loragate.cli import build_configs, build_parser

    g = build_configs(build_parser().parse_args([
        "serve", "--model", str(tmp_path), "--max-request-bytes", "1MiB", "--max-waiting", "7",
        "--shutdown-timeout", "2.5", "--metrics-auth", "admin"])).gateway
    assert (g.max_request_bytes, g.max_waiting, g.shutdown_timeout, g.metrics_auth) == (1 << 20, 7, 2.5, "admin")
    g = build_configs(build_parser().parse_args(["serve", "--model", str(tmp_path), "--max-waiting", "0"])).gateway
    assert g.max_waiting is None and g.metrics_auth == "open" and g.max_request_bytes == 4 << 20


def test_stop_lists_are_bounded(env):
    r = post(env["url"], "/v1/completions", completion(stop=[f"s{i}" for i in range(65)]))
    assert assert_error_shape(r, 400)["param"] == "stop"
    r = post(env["url"], "/v1/completions", completion(stop_token_ids=list(range(1025))))
    assert assert_error_shape(r, 400)["param"] == "stop_token_ids"
    assert post(env["url"], "/v1/completions", completion(stop=[f"s{i}" for i in range(64)])).status_code == 200


def test_array_limit_follows_the_model():
    from loragate.gateway.limits import json_items_limit

    assert json_items_limit(FakeEngine(max_model_len=100)) == FakeEngine().tokenizer.vocab_size  # 12291
    assert json_items_limit(FakeEngine(max_model_len=200_000)) == 200_000
    app = create_app(FakeEngine(max_model_len=10), GatewaySettings())
    assert app.state.ctx.max_json_items == 12291
