"""Property-based fuzzing of every route against a live server on the real engine (tiny checkpoint).

Two generators, both driven by the server's own `/openapi.json`:
* Schemathesis cases for every operation, positive (valid per the schema) and negative (invalid),
  half of the body cases steered towards a model that exists so that generation really runs;
* "extremes": for every property of every request body in the schema, values far outside their
  natural ranges (huge and negative integers, 1e308, NaN and Infinity literals), strings with NUL
  bytes and lone UTF-16 surrogates, deeply nested JSON and huge arrays, sent as raw JSON.

Every answer must be below 500, every error OpenAI-shaped, every 2xx must match its schema, and the
server must answer normally afterwards (health 200, a greedy completion equal to the one before).
Crashes found by this run are pinned as named tests in test_fuzz_regressions.py.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loragate.engine.async_engine import AsyncEngine
from loragate.engine.config import EngineConfig
from loragate.gateway import GatewaySettings, create_app
from loragate.testing import build_adapter
from tests.test_gateway import running_server

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

ADMIN, TENANT = "sk-fuzz-admin", "sk-fuzz-tenant"
MODELS = ["tiny", "fz-a", "fz-b", "tiny:fz-a"]
EXAMPLES = {"POST /v1/chat/completions": 120, "POST /v1/completions": 120}
DEFAULT_EXAMPLES = 25
FUZZ_SETTINGS = dict(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def live(checkpoints, tmp_path_factory):
    base = checkpoints("llama3")
    root = tmp_path_factory.mktemp("fuzz-adapters")
    build_adapter(base, root / "fz-a", rank=4, alpha=8, seed=21)
    build_adapter(base, root / "fz-b", rank=2, alpha=4, targets=("o_proj",), seed=22)
    cfg = EngineConfig(model=str(base), served_model_name="tiny", dtype="float32", device="cpu",
                       adapter_dir=str(root), max_loras=2, max_lora_rank=8, kv_cache_memory=32 << 20,
                       block_size=8, max_model_len=128, max_num_seqs=128)
    engine = AsyncEngine(cfg)
    settings_ = GatewaySettings(api_keys=(ADMIN,), allowed_adapter_dirs=(str(root),),
                                api_keys_file={"keys": [{"key": TENANT, "tenant": "t", "adapters": ["fz-a"]}]})
    with running_server(create_app(engine, settings_)) as url:
        doc = httpx.get(url + "/openapi.json").json()
        before = greedy(url)
        yield {"url": url, "doc": doc, "engine": engine, "reference": before}
        assert httpx.get(url + "/health").json() == {"status": "ok"}
        assert greedy(url) == before  # the server answers normally afterwards
        assert engine.is_alive


def greedy(url: str) -> str:
    r = httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60,
                   json={"model": "fz-a", "prompt": "the quick brown fox", "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def assert_openai_error(resp) -> None:
    if resp.status_code < 400:
        return
    body = resp.json()
    assert set(body) >= {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def test_openapi_document_describes_every_body(live):
    doc = live["doc"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert "422" not in op["responses"], (method, path)
            if method in ("post", "put", "patch"):
                ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                assert ref.split("/")[-1] in doc["components"]["schemas"]
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert chat["additionalProperties"] is True and {"model", "messages"} <= set(chat["required"])
    assert httpx.get(live["url"] + "/docs").status_code == 200


def _steer(draw, case) -> None:
    """Half the time, point a generated body at a real model with small, valid generation limits."""
    body = case.body
    if not isinstance(body, dict) or not draw(st.booleans()):
        return
    body["model"] = draw(st.sampled_from(MODELS))
    if "messages" in body or "prompt" not in body:
        msgs = body.get("messages")
        if isinstance(msgs, list):
            for m in msgs:
                if isinstance(m, dict):
                    m["role"] = draw(st.sampled_from(["user", "system", "assistant", "developer"]))
    body["max_tokens"] = draw(st.integers(1, 6))
    body.pop("max_completion_tokens", None)
    if isinstance(body.get("n"), int):
        body["n"] = min(max(body["n"], 1), 3)


def _operations(doc: dict) -> list[tuple[str, str]]:
    return [(path, method.upper()) for path, ops in doc["paths"].items() for method in ops]


def _call(case, url: str, key: str):
    resp = case.call(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    case.validate_response(resp, checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                         response_schema_conformance])
    assert_openai_error(resp)
    return resp


@pytest.mark.slow
def test_schemathesis_every_operation(live):
    schema = schemathesis.openapi.from_dict(live["doc"])
    url = live["url"]
    seen: dict[str, set[int]] = {}
    for path, method in _operations(live["doc"]):
        op = schema[path][method]
        label = f"{method} {path}"
        strategy = st.one_of(op.as_strategy(generation_mode=GenerationMode.POSITIVE),
                             op.as_strategy(generation_mode=GenerationMode.NEGATIVE))

        @settings(max_examples=EXAMPLES.get(label, DEFAULT_EXAMPLES), **FUZZ_SETTINGS)
        @given(data=st.data())
        def run(data):
            case = data.draw(strategy)
            if method == "DELETE":  # keep the fixture's adapters: deleting them is tested elsewhere
                case.path_parameters = {"name": data.draw(st.text(min_size=1, max_size=20)
                                                          .filter(lambda n: n not in MODELS))}
            _steer(data.draw, case)
            key = data.draw(st.sampled_from([ADMIN, ADMIN, TENANT]))
            seen.setdefault(label, set()).add(_call(case, url, key).status_code)

        run()
    # the generated cases reached real work, not only validation errors
    assert 200 in seen["POST /v1/chat/completions"] and 200 in seen["POST /v1/completions"], seen


# ---- extremes, for every property of every request body the schema declares ---------------------

DEEP = "[" * 3000 + "]" * 3000
# JSON text of each value, written raw: NaN/Infinity literals, lone surrogates as \uXXXX escapes
# (valid JSON text, invalid Unicode), and nesting/array sizes past the server's limits
EXTREMES = ["0", "-1", str(2**31), str(-(2**31) - 1), str(2**63), str(-(2**63) - 1), str(2**64), str(10**30),
            str(-(10**30)), "1e308", "-1e308", "5e-324", "-0.0", "NaN", "Infinity", "-Infinity", "null", "true",
            "{}", "[]", '""', r'"\u0000"', r'"a\u0000b"', r'"\ud800"', r'"x\udfffy"', r'"\ud83d\ude00"',
            r'"\u202e\uffff"', r'["\ud800"]', r'{"\udc00": 1}', '[[[[["deep"]]]]]', DEEP]
# megabytes each: sent to the fields where size matters (lists, maps, text) and one unknown field
HUGE = ["[" + ",".join(["0"] * 300_000) + "]", "[" + ",".join(['"x"'] * 100_000) + "]",
        "{" + ",".join(f'"{i}": 1' for i in range(300_000)) + "}", '"' + "y" * 1_000_000 + '"']
HUGE_FIELDS = {"prompt", "messages", "stop", "logit_bias", "content", "path", "x-extra"}


def _body_properties(doc: dict) -> list[tuple[str, str, str]]:
    """(path, body schema name, property) for every property of every request body, plus one
    unknown property (requests accept unknown fields)."""
    out = []
    schemas = doc["components"]["schemas"]
    for path, ops in doc["paths"].items():
        for op in ops.values():
            ref = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            if "$ref" in ref:
                name = ref["$ref"].split("/")[-1]
                out += [(path, name, prop) for prop in schemas[name].get("properties", {})] + [(path, name, "x-extra")]
    return out


BASES = {"ChatCompletionRequest": {"model": "fz-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
         "CompletionRequest": {"model": "fz-a", "prompt": "hi", "max_tokens": 4},
         "RegisterAdapterRequest": {"name": "new-one", "path": "/nonexistent"}}
MESSAGE_FIELDS = ("role", "content", "name", "tool_calls")


_HTTP = httpx.Client(timeout=60, limits=httpx.Limits(max_connections=16))  # one pool: a Client costs ~50 ms


def _send(url: str, path: str, raw: str) -> httpx.Response:
    return _HTTP.post(url + path, content=raw.encode("utf-8"),
                      headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"})


def _body_with(name: str, prop: str, value: str, in_message: bool = False) -> str:
    base = BASES[name]
    if in_message:
        msg = {"role": "user", "content": "hi"}
        fields = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in msg.items() if k != prop] + [f'"{prop}": {value}']
        body = {k: v for k, v in base.items() if k != "messages"}
        return json.dumps(body)[:-1] + ', "messages": [{' + ", ".join(fields) + "}]}"
    parts = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in base.items() if k != prop] + [f'"{prop}": {value}']
    return "{" + ", ".join(parts) + "}"


@pytest.mark.slow
def test_extreme_values_in_every_body_property(live):
    """Every property of every request body (and each field of a chat message) set to each extreme
    value in turn: nothing is a 5xx, every error is OpenAI-shaped."""
    url = live["url"]
    targets = _body_properties(live["doc"])
    assert {n for _, n, _ in targets} == set(BASES)  # a new body model needs a base request here
    cases = [(path, name, prop, False) for path, name, prop in targets]
    cases += [("/v1/chat/completions", "ChatCompletionRequest", f, True) for f in MESSAGE_FIELDS]
    jobs = [(path, name, prop, in_message, value) for path, name, prop, in_message in cases
            for value in EXTREMES + (HUGE if prop in HUGE_FIELDS else [])]

    def check(job) -> tuple | None:
        path, name, prop, in_message, value = job
        resp = _send(url, path, _body_with(name, prop, value, in_message))
        try:
            assert resp.status_code < 500
            assert_openai_error(resp)
        except (AssertionError, ValueError):
            return path, prop, in_message, value[:40], resp.status_code, resp.text[:300]
        return None

    with ThreadPoolExecutor(max_workers=8) as pool:  # several clients at once, as in production
        failures = [f for f in pool.map(check, jobs) if f is not None]
    assert not failures, failures[:10]


@pytest.mark.slow
def test_random_text_in_every_string_field(live):
    """Hypothesis strings (any BMP code point but surrogates, NUL included) in every body field."""
    url = live["url"]
    targets = _body_properties(live["doc"])

    @settings(max_examples=150, **FUZZ_SETTINGS)
    @given(target=st.sampled_from(targets), text=st.text(st.characters(min_codepoint=0, max_codepoint=0xFFFF),
                                                           max_size=60))
    def run(target, text):
        path, name, prop = target
        resp = _send(url, path, _body_with(name, prop, json.dumps(text)))
        assert resp.status_code < 500, (path, prop, text, resp.text[:300])
        assert_openai_error(resp)

    run()
