"""Property-based fuzzing of every route against a live server on the real engine (tiny checkpoint).

Two generators, both driven by the server's own `/openapi.json`:
* Schemathesis cases for every operation, positive (valid per the schema) and negative (invalid),
  half of the body cases steered towards a model or adapter that exists (and small generation
  limits) so that generation, merging and tokenizing really run;
* "extremes": for every property of every request body in the schema, and of the objects nested in
  them (a chat message, LoRAX's `parameters` and `merged_adapters`), values far outside their
  natural ranges (huge and negative integers, 1e308, NaN and Infinity literals), strings with NUL
  bytes and lone UTF-16 surrogates, deeply nested JSON and huge arrays, sent as raw JSON.

Every answer must be below 500 and every 2xx must match its schema. Errors have their route's
shape: LoRAX's `{"error", "error_type"}` with LoRAX's statuses (422 validation, 424 adapter or
generation, 429 overloaded; 401/403/413 ours) on `/generate`, `/generate_stream` and `/`, the
OpenAI shape everywhere else; an error event inside a 200 stream is never a server error; and no
LoRAX answer hides a server error behind its 424 (the fixture records every error the LoRAX routes
render). The server must answer normally afterwards (health 200, a greedy completion equal to the
one before). Crashes found by this run are pinned as named tests in test_fuzz_regressions.py.
"""
from __future__ import annotations

import copy
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loragate.engine.async_engine import AsyncEngine
from loragate.engine.config import EngineConfig
from loragate.gateway import GatewaySettings, create_app
from loragate.gateway.errors import APIError
from loragate.gateway.lorax_protocol import error_status
from loragate.gateway.routes import lorax as lorax_routes
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
LORAX_PATHS = frozenset({"/generate", "/generate_stream", "/"})
# LoRAX's statuses and error types (lorax_protocol.error_status); 401/403/413 are ours, in its shape
LORAX_ERROR_TYPES = {401: "authentication", 403: "permission", 413: "validation", 422: "validation",
                     424: "generation", 429: "overloaded"}
EXAMPLES = {"POST /v1/chat/completions": 120, "POST /v1/completions": 120, "POST /generate": 80,
            "POST /generate_stream": 40, "POST /": 40, "POST /tokenize": 40, "POST /detokenize": 40}
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
    internal: list = []  # server errors the LoRAX routes rendered (LoRAX reports some of them as a 424)
    render = lorax_routes.error_body

    def recording(err):
        if err.status >= 500:
            internal.append(f"{err.status} {err.code}: {err.message}")
        return render(err)

    with pytest.MonkeyPatch.context() as mp, running_server(create_app(engine, settings_)) as url:
        mp.setattr(lorax_routes, "error_body", recording)
        doc = httpx.get(url + "/openapi.json").json()
        before = greedy(url)
        yield {"url": url, "doc": doc, "engine": engine, "reference": before, "root": str(root),
               "internal": internal}
        assert not internal, internal[:10]
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


def assert_lorax_error(resp) -> None:
    if resp.status_code < 400:
        return
    body = resp.json()
    assert set(body) == {"error", "error_type"} and isinstance(body["error"], str) and body["error"], body
    assert LORAX_ERROR_TYPES.get(resp.status_code) == body["error_type"], (resp.status_code, body)


def _stream_errors(resp) -> list[dict]:
    """The error events of a 200 text/event-stream (every `data:` is JSON or [DONE])."""
    errors = []
    for line in resp.text.splitlines():
        if line.startswith("data:") and line[5:].strip() != "[DONE]":
            event = json.loads(line[5:])
            if "error" in event:
                errors.append(event)
    return errors


def assert_error_shape(path: str, resp) -> None:
    """The route's error shape (LoRAX's on its routes, OpenAI's elsewhere); a stream's error event
    has it too and is never a server error."""
    lorax = path in LORAX_PATHS
    (assert_lorax_error if lorax else assert_openai_error)(resp)
    content_type = resp.headers.get("content-type") or ""  # a list of values in Schemathesis' responses
    content_type = content_type if isinstance(content_type, str) else content_type[0]
    if resp.status_code == 200 and content_type.startswith("text/event-stream"):
        for event in _stream_errors(resp):
            if lorax:
                assert set(event) == {"error", "error_type"}, event
                assert event["error_type"] not in ("incomplete_generation", "unhealthy"), event
            else:
                assert set(event["error"]) == {"message", "type", "param", "code"}, event
                assert event["error"]["type"] != "server_error", event


def _error_schema(response: dict) -> str:
    return response.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref", "").split("/")[-1]


def test_openapi_document_describes_every_body(live):
    doc = live["doc"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            errors = {s: _error_schema(r) for s, r in op["responses"].items() if int(s) >= 400}
            expected = {"LoraxErrorResponse"} if path in LORAX_PATHS else {"ErrorResponse", "HealthStatus"}
            assert errors and set(errors.values()) <= expected, (method, path, errors)
            assert ("422" in errors) == (path in LORAX_PATHS), (method, path)  # LoRAX's own 422, no FastAPI one
            if method in ("post", "put", "patch"):
                ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                assert ref.split("/")[-1] in doc["components"]["schemas"]
    schemas = doc["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]
    assert chat["additionalProperties"] is True and {"model", "messages"} <= set(chat["required"])
    paths = doc["paths"]
    assert paths["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/LoraxRequest")
    assert {"inputs"} == set(schemas["LoraxRequest"]["required"])
    assert {"adapter_id", "merged_adapters", "max_new_tokens", "return_k_alternatives"} <= set(
        schemas["LoraxParameters"]["properties"])
    assert set(paths["/generate_stream"]["post"]["responses"]["200"]["content"]) == {"text/event-stream"}
    assert set(paths["/"]["post"]["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert set(paths["/v1/load_lora_adapter"]["post"]["responses"]["200"]["content"]) == {"text/plain"}
    assert schemas["TokenizeResponse"]["required"] == ["count", "max_model_len", "tokens"]
    # the errors the LoRAX routes raise render as statuses and error types the document names
    error_types = set(schemas["LoraxErrorResponse"]["properties"]["error_type"]["enum"])
    raised = [(400, None), (400, "adapter_load_error"), (401, None), (403, "forbidden"), (404, "model_not_found"),
              (413, "request_too_large"), (429, "rate_limit_exceeded"), (500, "generation_error"), (500, "aborted"),
              (500, "internal_error"), (503, "server_overloaded"), (503, "engine_dead")]
    for status, code in raised:
        rendered, error_type = error_status(APIError(status, "x", code=code))
        assert error_type in error_types and str(rendered) in paths["/generate"]["post"]["responses"], (
            status, code, rendered, error_type)
    assert httpx.get(live["url"] + "/docs").status_code == 200


# ---- Schemathesis ---------------------------------------------------------------------------------

def _steer(draw, path: str, case, vocab: int) -> None:
    """Half the time, point a generated body at a real model or adapter with small, valid
    generation limits, so that the work behind validation runs too."""
    body = case.body
    if path == "/v1/unload_lora_adapter" and isinstance(body, dict) and body.get("lora_name") in MODELS:
        body["lora_name"] = "fz-absent"  # keep the fixture's adapters: unloading is tested elsewhere
    if not isinstance(body, dict) or not draw(st.booleans()):
        return
    if path in LORAX_PATHS:
        _steer_lorax(draw, body)
    elif path in ("/tokenize", "/detokenize"):
        body["model"] = draw(st.sampled_from(MODELS))
        if path == "/detokenize":
            body["tokens"] = draw(st.lists(st.integers(0, vocab - 1), max_size=8))
    elif path in ("/v1/chat/completions", "/v1/completions"):
        body["model"] = draw(st.sampled_from(MODELS))
        if "messages" in body or "prompt" not in body:
            msgs = body.get("messages")
            if isinstance(msgs, list):
                for m in msgs:
                    if isinstance(m, dict):
                        m["role"] = draw(st.sampled_from(["user", "system", "assistant", "developer"]))
                        if not isinstance(m.get("content"), str):
                            m["content"] = draw(st.sampled_from(["hi", "the quick brown fox"]))
        body["max_tokens"] = draw(st.integers(1, 6))
        body.pop("max_completion_tokens", None)
        for field, needs in (("top_logprobs", "logprobs"), ("stream_options", "stream")):
            if body.get(needs) is not True:  # refused without it: a request that asks for little else
                body.pop(field, None)
        if isinstance(body.get("n"), int):
            body["n"] = min(max(body["n"], 1), 3)


def _steer_lorax(draw, body: dict) -> None:
    """A LoRAX body on the base, an adapter, or a merge of both adapters (from a few weights, so
    that merges are built and then found in the cache), with few new tokens and choices."""
    if not isinstance(body.get("inputs"), str) or not body["inputs"]:
        body["inputs"] = draw(st.sampled_from(["hi", "the quick brown fox"]))
    p = body.get("parameters")
    if not isinstance(p, dict):
        p = body["parameters"] = {}
    p.pop("adapter_source", None)
    p.pop("merged_adapters", None)
    target = draw(st.sampled_from([None, "", "fz-a", "fz-b", "merge"]))
    p["adapter_id"] = None if target == "merge" else target
    if target == "merge":
        weight = st.sampled_from([0.25, 0.5, 1.0])
        p["merged_adapters"] = {"ids": ["fz-a", "fz-b"], "weights": [draw(weight), draw(weight)],
                                "merge_strategy": draw(st.sampled_from(["linear", "ties", "dare_linear", "dare_ties"])),
                                "density": draw(st.sampled_from([0.5, 1.0])),
                                "majority_sign_method": draw(st.sampled_from(["total", "frequency"]))}
    p["max_new_tokens"] = draw(st.integers(1, 6))
    for name, hi in (("best_of", 3), ("return_k_alternatives", 5)):
        if isinstance(p.get(name), int):
            p[name] = min(max(p[name], 1), hi)


def _operations(doc: dict) -> list[tuple[str, str]]:
    return [(path, method.upper()) for path, ops in doc["paths"].items() for method in ops]


def _call(case, path: str, url: str, key: str):
    resp = case.call(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    case.validate_response(resp, checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                         response_schema_conformance])
    assert_error_shape(path, resp)
    return resp


@pytest.mark.slow
def test_schemathesis_every_operation(live):
    schema = schemathesis.openapi.from_dict(live["doc"])
    url = live["url"]
    vocab = live["engine"].tokenizer.vocab_size
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
            _steer(data.draw, path, case, vocab)
            key = data.draw(st.sampled_from([ADMIN, ADMIN, TENANT]))
            seen.setdefault(label, set()).add(_call(case, path, url, key).status_code)

        run()
    # the generated cases reached real work, not only validation errors
    for label in ("POST /v1/chat/completions", "POST /v1/completions", "POST /generate", "POST /generate_stream",
                  "POST /", "POST /tokenize", "POST /detokenize"):
        assert 200 in seen[label], (label, seen)
    assert not live["internal"], live["internal"][:10]


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
HUGE_FIELDS = {"prompt", "messages", "stop", "logit_bias", "content", "path", "inputs", "tokens", "lora_path", "ids",
               "weights"}
EXTRA = "x-extra"  # an unknown property, at the top level and inside each nested object
# fields a model accepts as extras and a route reads anyway
UNDECLARED = {"ChatMessage": ("tool_calls", "function_call")}

# a valid request per body model; the sweep sets one property at a time
BASES = {"ChatCompletionRequest": {"model": "fz-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
         "CompletionRequest": {"model": "fz-a", "prompt": "hi", "max_tokens": 4},
         "RegisterAdapterRequest": {"name": "new-one", "path": "/nonexistent"},
         "LoraxRequest": {"inputs": "hi", "parameters": {"adapter_id": "fz-a", "max_new_tokens": 4}},
         # the adapters' root: inside --allowed-adapter-dir, a folder, and not an adapter (nothing loads)
         "LoadLoRAAdapterRequest": {"lora_name": "fz-new", "lora_path": "{root}"},
         "UnloadLoRAAdapterRequest": {"lora_name": "fz-absent"},
         "TokenizeRequest": {"model": "fz-a", "prompt": "hi"},
         "DetokenizeRequest": {"model": "fz-a", "tokens": [1, 2, 3]}}
# where a nested object's properties are only reached from another valid request
NESTED_BASES = {
    ("LoraxRequest", ("parameters", "merged_adapters")): {
        "inputs": "hi", "parameters": {"max_new_tokens": 4, "merged_adapters": {
            "ids": ["fz-a", "fz-b"], "weights": [0.5, 0.5], "merge_strategy": "linear"}}},
    ("TokenizeRequest", ("messages", 0)): {"model": "fz-a", "messages": [{"role": "user", "content": "hi"}]},
}
# LoRAX's compat route is /generate or /generate_stream as its `stream` says: its top-level
# properties are swept, the nested ones (the same code) only on those two
TOP_LEVEL_ONLY = {"/"}
Target = tuple[str, str, tuple]  # (path, body model, property path inside the body)


def _nested_model(schema: dict) -> tuple[str, bool] | None:
    """(component name, is an array of it) when a property holds an object model of the document."""
    for s in [schema, *schema.get("anyOf", []), *schema.get("oneOf", [])]:
        if "$ref" in s:
            return s["$ref"].split("/")[-1], False
        if s.get("type") == "array" and "$ref" in s.get("items", {}):
            return s["items"]["$ref"].split("/")[-1], True
    return None


def _property_paths(schemas: dict, model: str, prefix: tuple = (), depth: int = 0) -> list[tuple]:
    out = []
    for prop, schema in schemas[model].get("properties", {}).items():
        out.append((*prefix, prop))
        nested = _nested_model(schema)
        if nested is not None and depth < 2:
            name, array = nested
            out += _property_paths(schemas, name, (*prefix, prop, 0) if array else (*prefix, prop), depth + 1)
    return [*out, *((*prefix, prop) for prop in UNDECLARED.get(model, ())), (*prefix, EXTRA)]


def _body_targets(doc: dict) -> list[Target]:
    """(path, body schema name, property path) for every property of every request body and of
    the objects nested in it (two levels), plus one unknown property at each level (requests accept
    unknown fields)."""
    out = []
    schemas = doc["components"]["schemas"]
    for path, ops in doc["paths"].items():
        for op in ops.values():
            ref = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            if "$ref" in ref:
                name = ref["$ref"].split("/")[-1]
                out += [(path, name, props) for props in _property_paths(schemas, name)
                        if len(props) == 1 or path not in TOP_LEVEL_ONLY]
    return out


_HTTP = httpx.Client(timeout=60, limits=httpx.Limits(max_connections=16))  # one pool: a Client costs ~50 ms
_SLOT = "\u0001fuzz-value\u0001"


def _send(url: str, path: str, raw: str) -> httpx.Response:
    return _HTTP.post(url + path, content=raw.encode("utf-8"),
                      headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"})


def _body_with(name: str, props: tuple, value: str, root: str) -> str:
    """The base request of `name` (or of the nested object holding the property) with the property
    at `props` set to the raw JSON text `value`; containers missing from the base are added."""
    body = copy.deepcopy(NESTED_BASES.get((name, props[:-1]), BASES[name]))
    if name == "LoadLoRAAdapterRequest":
        body["lora_path"] = root
    node = body
    for key, nxt in zip(props[:-1], props[1:]):
        if isinstance(key, int):
            node = node[key]
            continue
        if not isinstance(node.get(key), (dict, list)):
            node[key] = [{}] if isinstance(nxt, int) else {}
        node = node[key]
    node[props[-1]] = _SLOT
    return json.dumps(body).replace(json.dumps(_SLOT), value)


def _values(props: tuple) -> list[str]:
    huge = props[-1] in HUGE_FIELDS or props == (EXTRA,)
    return EXTREMES + (HUGE if huge else [])


@pytest.mark.slow
def test_extreme_values_in_every_body_property(live):
    """Every property of every request body (and of each object nested in one) set to each extreme
    value in turn: nothing is a 5xx, every error has its route's shape."""
    url, root = live["url"], live["root"]
    targets = _body_targets(live["doc"])
    assert {n for _, n, _ in targets} == set(BASES)  # a new body model needs a base request here
    jobs = [(path, name, props, value) for path, name, props in targets for value in _values(props)]

    def check(job) -> tuple | None:
        path, name, props, value = job
        resp = _send(url, path, _body_with(name, props, value, root))
        try:
            assert resp.status_code < 500
            assert_error_shape(path, resp)
        except (AssertionError, ValueError):
            return path, props, value[:40], resp.status_code, resp.text[:300]
        return None

    with ThreadPoolExecutor(max_workers=8) as pool:  # several clients at once, as in production
        failures = [f for f in pool.map(check, jobs) if f is not None]
    first = {f[:2]: f for f in reversed(failures)}  # the first failure of each property
    assert not failures, (len(failures), list(first.values())[:20])
    assert not live["internal"], live["internal"][:10]


@pytest.mark.slow
def test_random_text_in_every_string_field(live):
    """Hypothesis strings (any BMP code point but surrogates, NUL included) in every body field."""
    url, root = live["url"], live["root"]
    targets = _body_targets(live["doc"])

    @settings(max_examples=150, **FUZZ_SETTINGS)
    @given(target=st.sampled_from(targets), text=st.text(st.characters(min_codepoint=0, max_codepoint=0xFFFF),
                                                           max_size=60))
    def run(target, text):
        path, name, props = target
        resp = _send(url, path, _body_with(name, props, json.dumps(text), root))
        assert resp.status_code < 500, (path, props, text, resp.text[:300])
        assert_error_shape(path, resp)

    run()
