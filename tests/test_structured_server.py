"""Structured outputs and tool calling through a real server (uvicorn + gateway + AsyncEngine on a
tiny random checkpoint with adapters), driven by the real clients: the openai SDK's `parse` and
stream helper, LangChain's `with_structured_output` and `bind_tools`, and raw HTTP for the SSE
contract and the 400s. The model is untrained: every answer is valid because the grammar makes it
so, and that is checked with `jsonschema`, `re.fullmatch` and the choice lists."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from loragate.engine.async_engine import AsyncEngine
from loragate.engine.config import EngineConfig
from loragate.gateway import GatewaySettings, create_app
from loragate.testing import build_adapter
from tests.fake_engine import FakeEngine
from tests.test_gateway import running_server

KEY = "sk-structured"
MODELS = ["tiny", "ad0", "ad1", "ad2"]


class Ticket(BaseModel):
    title: str = Field(max_length=12)
    priority: Literal["low", "medium", "high"]
    urgent: bool
    hours: int = Field(ge=1, le=40)


WEATHER = {"type": "object", "properties": {"city": {"enum": ["paris", "tokyo", "lima"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
SEARCH = {"type": "object", "properties": {"q": {"type": "string", "maxLength": 10}}, "required": ["q"],
          "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "search", "parameters": SEARCH}},
         {"type": "function", "function": {"name": "clock"}}]
PARAMS = {"get_weather": WEATHER, "search": SEARCH, "clock": {"type": "object", "additionalProperties": False}}


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    base = checkpoints("llama3")
    root = tmp_path_factory.mktemp("structured-server-adapters")
    for i, targets in enumerate([("q_proj", "v_proj"), ("o_proj",), ("gate_proj", "down_proj")]):
        build_adapter(base, root / f"ad{i}", rank=4, alpha=8, targets=targets, seed=70 + i)
    cfg = EngineConfig(model=str(base), served_model_name="tiny", dtype="float32", device="cpu",
                       adapter_dir=str(root), max_loras=4, max_lora_rank=8, kv_cache_memory=32 << 20,
                       block_size=8, max_num_seqs=32, max_model_len=512)
    engine = AsyncEngine(cfg)
    with running_server(create_app(engine, GatewaySettings(api_keys=(KEY,)))) as url:
        yield {"url": url, "engine": engine}


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def user(text: str = "answer please") -> list[dict]:
    return [{"role": "user", "content": text}]


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server["url"] + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def check_call(call) -> dict:
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, PARAMS[call.function.name])
    assert call.id.startswith("call_") and call.type == "function"
    return args


# ---------------------------------------------------------------------------------------------- outputs
def test_openai_parse_with_pydantic_on_base_and_adapters(server):
    c = client(server)

    def one(args):
        model, temp, seed = args
        return c.chat.completions.parse(model=model, messages=user("file a ticket"), response_format=Ticket,
                                        temperature=temp, seed=seed, max_tokens=200)

    runs = [(m, t, s) for m in MODELS for t, s in ((0.0, None), (1.0, 11))]
    with ThreadPoolExecutor(8) as pool:  # concurrent: base and adapters share batches
        results = list(pool.map(one, runs))
    for r in results:
        choice = r.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Ticket)
        assert Ticket.model_validate_json(choice.message.content) == choice.message.parsed


def test_json_schema_not_strict_and_n_choices(server):
    schema = {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["x", "y", "z"]},
                                                        "maxItems": 3}, "score": {"type": "number", "minimum": 0,
                                                                                  "maximum": 1}},
              "required": ["tags", "score"], "additionalProperties": False}
    r = client(server).chat.completions.create(
        model="ad1", messages=user(), n=3, temperature=1.0, seed=4, max_tokens=120,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": False}})
    assert len(r.choices) == 3
    for ch in r.choices:
        assert ch.finish_reason == "stop"
        jsonschema.validate(json.loads(ch.message.content), schema)


def test_json_object_mode_gives_an_object_or_a_valid_prefix(server):
    compiler = server["engine"].engine.structured.compiler
    from loragate.engine.structured import StructuredSpec

    r = client(server).chat.completions.create(model="ad2", messages=user(), max_tokens=60, temperature=0,
                                               response_format={"type": "json_object"})
    ch = r.choices[0]
    if ch.finish_reason == "stop":
        assert isinstance(json.loads(ch.message.content), dict)
    else:  # the model is random: an open-ended object may run out of tokens, but never leave the grammar
        m = compiler.compile_now(StructuredSpec.json({"type": "object"})).matcher()
        ids = server["engine"].tokenizer.encode(ch.message.content, add_special_tokens=False)
        assert ch.message.content.startswith("{") and all(m.accept(t) for t in ids)


@pytest.mark.parametrize("extra,check", [
    ({"structured_outputs": {"regex": r"[a-z]{3,8}@[a-z]{2,5}\.(com|org)"}},
     lambda t: re.fullmatch(r"[a-z]{3,8}@[a-z]{2,5}\.(com|org)", t)),
    ({"guided_regex": r"-?[0-9]{1,4}"}, lambda t: re.fullmatch(r"-?[0-9]{1,4}", t)),
    ({"structured_outputs": {"choice": ["red", "green", "light blue"]}}, lambda t: t in ("red", "green", "light blue")),
    ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
    ({"structured_outputs": {"grammar": 'start: "(" NUM ("," NUM)* ")"\nNUM: /[0-9]/'}},
     lambda t: re.fullmatch(r"\([0-9](,[0-9])*\)", t)),
    ({"guided_grammar": 'root ::= ("ab" | "cd")+'}, lambda t: re.fullmatch(r"(ab|cd)+", t)),
    ({"guided_json": WEATHER}, lambda t: jsonschema.validate(json.loads(t), WEATHER) is None),
    ({"structured_outputs": {"json": json.dumps(SEARCH)}},
     lambda t: jsonschema.validate(json.loads(t), SEARCH) is None),
])
def test_vllm_constraints_on_chat_and_completions(server, extra, check):
    c = client(server)
    for model in ("tiny", "ad0"):
        chat = c.chat.completions.create(model=model, messages=user(), max_tokens=40, temperature=1.0, seed=3, n=2,
                                         extra_body=extra)
        comp = c.completions.create(model=model, prompt="the quick brown", max_tokens=40, temperature=1.0, seed=5,
                                    extra_body=extra)
        texts = [ch.message.content for ch in chat.choices] + [comp.choices[0].text]
        for ch in [*chat.choices, comp.choices[0]]:
            if ch.finish_reason == "length":  # only an unbounded repetition may run out of tokens
                assert "+" in json.dumps(extra) or "*" in json.dumps(extra)
        for t, ch in zip(texts, [*chat.choices, comp.choices[0]]):
            if ch.finish_reason == "stop":
                assert check(t), t


def test_completions_take_response_format_too(server):
    r = client(server).completions.create(model="ad0", prompt="weather:", max_tokens=60, temperature=0,
                                          extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                              "name": "w", "schema": WEATHER}}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].text), WEATHER)


# ---------------------------------------------------------------------------------------------- tools
@pytest.mark.parametrize("model", MODELS)
def test_tool_choice_required_named_and_none(server, model):
    c = client(server)
    req = c.chat.completions.create(model=model, messages=user("weather in paris?"), tools=TOOLS, temperature=0,
                                    tool_choice="required", parallel_tool_calls=False, max_tokens=80)
    ch = req.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None and len(ch.message.tool_calls) == 1
    check_call(ch.message.tool_calls[0])

    for name in PARAMS:
        named = c.chat.completions.create(model=model, messages=user(), tools=TOOLS, temperature=1.0, seed=2,
                                          tool_choice={"type": "function", "function": {"name": name}},
                                          max_tokens=80).choices[0]
        assert named.finish_reason == "tool_calls" and named.message.content is None
        assert [tc.function.name for tc in named.message.tool_calls] == [name]
        check_call(named.message.tool_calls[0])

    none = c.chat.completions.create(model=model, messages=user(), tools=TOOLS, tool_choice="none",
                                     max_tokens=8, temperature=0).choices[0]
    assert none.message.tool_calls is None and isinstance(none.message.content, str)
    assert none.finish_reason in ("stop", "length")


def test_named_tool_with_n_choices_and_logprobs(server):
    r = client(server).chat.completions.create(
        model="ad0", messages=user(), tools=TOOLS, tool_choice={"type": "function", "function": {"name": "search"}},
        n=2, temperature=1.0, seed=8, max_tokens=60, logprobs=True, top_logprobs=2)
    assert len(r.choices) == 2
    for ch in r.choices:
        assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1
        check_call(ch.message.tool_calls[0])
        assert all(len(lp.top_logprobs) <= 2 for lp in ch.logprobs.content)
    assert sum(len(ch.logprobs.content) for ch in r.choices) == r.usage.completion_tokens


def test_required_with_parallel_calls_validates_every_call(server):
    r = client(server).chat.completions.create(model="ad1", messages=user(), tools=TOOLS, tool_choice="required",
                                               temperature=1.0, seed=9, max_tokens=200)
    ch = r.choices[0]
    calls = ch.message.tool_calls
    assert calls and ch.message.content is None
    complete = calls if ch.finish_reason == "tool_calls" else calls[:-1]  # a cut answer: the last may be partial
    assert ch.finish_reason in ("tool_calls", "length")
    for call in complete:
        check_call(call)


def sse_chunks(server, body: dict) -> list[dict]:
    with httpx.Client(timeout=120) as h:
        with h.stream("POST", server["url"] + "/v1/chat/completions", json={**body, "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def reassemble(chunks: list[dict]) -> tuple[str | None, list[tuple[str, str]], str | None]:
    """A stream as a client rebuilds it, checking each tool-call delta against the contract."""
    content, calls, reason = None, {}, None
    for ch in chunks:
        for choice in ch["choices"]:
            d = choice["delta"]
            if d.get("content") is not None:
                content = (content or "") + d["content"]
            for tc in d.get("tool_calls") or []:
                assert "function" in tc
                if tc["index"] not in calls:
                    assert tc["id"].startswith("call_") and tc["type"] == "function" and tc["function"]["name"]
                    calls[tc["index"]] = [tc["function"]["name"], tc["function"].get("arguments", "")]
                else:
                    assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
                    calls[tc["index"]][1] += tc["function"]["arguments"]
            reason = choice.get("finish_reason") or reason
    return content, [tuple(calls[i]) for i in sorted(calls)], reason


@pytest.mark.parametrize("extra", [
    {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False},
    {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    {"tools": TOOLS, "tool_choice": "auto"},
    {"tools": TOOLS, "tool_choice": "none", "max_tokens": 10},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}}},
])
def test_streamed_answers_reassemble_to_the_non_streamed_one(server, extra):
    body = {"model": "ad2", "messages": user("stream it"), "temperature": 0, "max_tokens": 60, **extra}
    whole = post(server, "/v1/chat/completions", body).json()["choices"][0]
    content, calls, reason = reassemble(sse_chunks(server, body))
    msg = whole["message"]
    assert reason == whole["finish_reason"]
    assert [(tc["function"]["name"], tc["function"]["arguments"]) for tc in msg.get("tool_calls") or []] == calls
    assert (content or None) == msg["content"]
    if extra.get("tool_choice") not in (None, "none", "auto"):
        assert calls and content is None and reason == "tool_calls"


def test_openai_stream_helper_sees_the_calls(server):
    c = client(server)
    tools = [{**TOOLS[0], "function": {**TOOLS[0]["function"], "strict": True}}]
    with c.chat.completions.stream(model="tiny", messages=user(), tools=tools, temperature=0, max_tokens=60,
                                   tool_choice={"type": "function", "function": {"name": "get_weather"}}) as s:
        events = [e.type for e in s]
        final = s.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert "tool_calls.function.arguments.done" in events
    assert call.function.parsed_arguments == check_call(call)


def test_history_round_trip_renders_calls_and_results(server):
    c = client(server)
    first = c.chat.completions.create(model="ad0", messages=user("weather?"), tools=TOOLS, tool_choice="required",
                                      parallel_tool_calls=False, temperature=0, max_tokens=80).choices[0].message
    call = first.tool_calls[0]
    history = user("weather?") + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    second = c.chat.completions.create(model="ad0", messages=history, tools=TOOLS, temperature=0, max_tokens=6)
    assert second.choices[0].finish_reason in ("stop", "length")
    tok = server["engine"].tokenizer
    rendered = [user("weather?")[0],
                {"role": "assistant", "content": "", "tool_calls": [{"id": call.id, "type": "function", "function": {
                    "name": call.function.name, "arguments": json.loads(call.function.arguments)}}]},
                {"role": "tool", "tool_call_id": call.id, "name": call.function.name, "content": "sunny, 21 C"}]
    text = tok.apply_chat_template(rendered, tools=TOOLS)
    assert "tools: get_weather(city, days), search(q), clock()" in text  # the template got the tools,
    assert f'<tool_call>{{"name": "{call.function.name}"' in text and "sunny, 21 C" in text  # the call and result
    assert second.usage.prompt_tokens == len(tok.encode_chat(rendered, tools=TOOLS))


# ---------------------------------------------------------------------------------------------- LangChain
def test_langchain_structured_output_three_methods(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="ad1", base_url=server["url"] + "/v1", api_key=KEY, temperature=0, max_tokens=200,
                     max_retries=0)
    for method in ("json_schema", "function_calling"):
        out = llm.with_structured_output(Ticket, method=method).invoke("file a ticket")
        assert isinstance(out, Ticket), method
    # JSON mode constrains to "any object": an untrained model would write keys and strings until
    # max_tokens, so a +100 bias on "}" (legal only where an object may close) ends it at once
    close = server["engine"].tokenizer.encode("}", add_special_tokens=False)
    assert len(close) == 1
    json_llm = ChatOpenAI(model="ad1", base_url=server["url"] + "/v1", api_key=KEY, temperature=0, max_tokens=50,
                          max_retries=0, logit_bias={close[0]: 100})
    parsed = json_llm.with_structured_output(None, method="json_mode").invoke("a JSON object please")
    assert parsed == {}


def test_langchain_bind_tools_any_then_tool_message(server):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: Literal["paris", "tokyo"], days: Literal[1, 2, 3]) -> str:
        """Weather forecast for a city."""
        return f"{city}: sunny for {days} days"

    llm = ChatOpenAI(model="ad2", base_url=server["url"] + "/v1", api_key=KEY, temperature=0, max_tokens=80,
                     max_retries=0)
    messages = [HumanMessage("weather in tokyo?")]
    ai = llm.bind_tools([get_weather], tool_choice="any", parallel_tool_calls=False).invoke(messages)
    assert [tc["name"] for tc in ai.tool_calls] == ["get_weather"]
    assert ai.response_metadata["finish_reason"] == "tool_calls"
    assert ai.tool_calls[0]["args"]["city"] in ("paris", "tokyo")
    messages += [ai, ToolMessage(get_weather.invoke(ai.tool_calls[0]["args"]), tool_call_id=ai.tool_calls[0]["id"])]
    final = llm.bind_tools([get_weather]).invoke(messages)
    assert isinstance(final.content, str)
    assert final.response_metadata["finish_reason"] in ("stop", "length", "tool_calls")
    streamed = list(llm.bind_tools([get_weather], tool_choice="get_weather").stream(messages[:1]))
    merged = streamed[0]
    for chunk in streamed[1:]:
        merged += chunk
    assert [tc["name"] for tc in merged.tool_calls] == ["get_weather"]


# ---------------------------------------------------------------------------------------------- bad input
BAD = [
    ({"guided_json": {"type": "nonsense"}}, "guided_json"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"tools": []}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"parameters": WEATHER}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "object"}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "bogus"}}}}}], "tool_choice": "required"}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "search"}},
      "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": WEATHER}}},
     "response_format.json_schema.schema"),
    ({"messages": user() + [{"role": "tool", "content": "orphan"}]}, "messages[1].tool_call_id"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"tool_choice": "required"}, "tool_choice"),
]


@pytest.mark.parametrize("extra,param", BAD)
def test_bad_input_is_a_400_naming_the_field_before_any_engine_work(server, extra, param):
    engine = server["engine"]
    before = engine.stats().steps
    r = post(server, "/v1/chat/completions", {"model": "ad0", "messages": user(), "max_tokens": 5, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    assert engine.stats().steps == before  # nothing reached the engine's step loop
    ok = post(server, "/v1/chat/completions", {"model": "ad0", "messages": user(), "max_tokens": 2})
    assert ok.status_code == 200


def test_bad_constraints_on_completions(server):
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": "x", "guided_regex": "[z-a]"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_regex"


def test_compile_time_limit_is_a_400_and_stalls_nobody():
    engine = FakeEngine(compile_hangs=True)
    settings = GatewaySettings(grammar_compile_timeout=0.3)
    with running_server(create_app(engine, settings)) as url:
        def slow():
            return httpx.post(url + "/v1/chat/completions", timeout=30, json={
                "model": "fake-base", "messages": user(), "guided_json": {"type": "object"}})

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(slow) for _ in range(3)]
            plain = httpx.post(url + "/v1/chat/completions", timeout=30,
                               json={"model": "fake-base", "messages": user(), "max_tokens": 3})
            results = [f.result() for f in futures]
        assert plain.status_code == 200
        for r in results:
            assert r.status_code == 400
            assert r.json()["error"]["param"] == "guided_json" and r.json()["error"]["code"] == "grammar_too_complex"
        assert not engine.requests or all(q.params.structured is None for q in engine.requests)


# ---------------------------------------------------------------------------------------------- fuzzing
def test_openapi_document_declares_the_new_fields(server):
    schemas = httpx.get(server["url"] + "/openapi.json").json()["components"]["schemas"]
    chat, completion = schemas["ChatCompletionRequest"]["properties"], schemas["CompletionRequest"]["properties"]
    constraints = {"structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                   "response_format"}
    assert constraints | {"tools", "tool_choice", "parallel_tool_calls"} <= set(chat)
    assert constraints <= set(completion)
    assert {"tool_calls", "tool_call_id"} <= set(schemas["ChatMessage"]["properties"])
    assert "tool_calls" in schemas["ChatResponseMessage"]["properties"]
    assert "response_format" in schemas["LoraxParameters"]["properties"]


_KEYWORDS = ["type", "properties", "items", "enum", "const", "required", "pattern", "minimum", "maximum",
             "maxLength", "minLength", "minItems", "maxItems", "additionalProperties", "anyOf", "oneOf", "$ref",
             "format", "$defs", "not", "if", "then", "x"]


def _json_values():
    from hypothesis import strategies as st

    leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                     st.floats(allow_nan=False, allow_infinity=False),  # a client cannot send NaN or inf as JSON
                     st.sampled_from(["object", "string", "integer", "array", "boolean", "null", "number",
                                      "#/$defs/a", "#", "^a+$", "(?=x)", "[", "date-time"]),
                     st.text(max_size=8))
    return st.recursive(leaf, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                     st.dictionaries(st.sampled_from(_KEYWORDS), kids, max_size=4)),
                        max_leaves=12)


@pytest.mark.slow
def test_random_constraints_never_cause_a_server_error(server):
    """Hypothesis-made schemas, regexes, grammars, choices and tools in every constraint field, on
    chat, completions and LoRAX's /generate: the answer is a 200 or a 400/422 naming a field, never a
    5xx, and the server keeps answering."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    text = st.text(max_size=30)
    value = _json_values()
    field = st.one_of(
        st.tuples(st.just("response_format"), st.fixed_dictionaries({
            "type": st.sampled_from(["json_schema", "json_object", "text", "yaml"]),
            "json_schema": st.one_of(value, st.fixed_dictionaries({"name": text, "schema": value}))})),
        st.tuples(st.sampled_from(["guided_json", "guided_regex", "guided_grammar", "guided_choice"]),
                  st.one_of(value, text)),
        st.tuples(st.just("structured_outputs"), st.dictionaries(
            st.sampled_from(["json", "regex", "choice", "grammar", "json_object", "other"]),
            st.one_of(value, text), max_size=2)),
        st.tuples(st.just("tools"), st.lists(st.fixed_dictionaries({
            "type": st.sampled_from(["function", "other"]),
            "function": st.one_of(value, st.fixed_dictionaries({"name": text, "parameters": value}))}), max_size=2)),
        st.tuples(st.just("tool_choice"), st.one_of(value, st.sampled_from(["auto", "none", "required"]))),
    )
    seen: set[int] = set()

    @settings(max_examples=120, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(kv=field, route=st.sampled_from(["chat", "completions", "lorax"]))
    def run(kv, route):
        name, val = kv
        if route == "chat":
            r = post(server, "/v1/chat/completions", {"model": "ad1", "messages": user(), "max_tokens": 3, name: val})
        elif route == "completions":
            r = post(server, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 3, name: val})
        else:
            r = post(server, "/generate", {"inputs": "x", "parameters": {"max_new_tokens": 3, "response_format": val}})
        seen.add(r.status_code)
        assert r.status_code in (200, 400, 422), (route, name, val, r.status_code, r.text[:300])
        if r.status_code == 400:
            assert r.json()["error"]["param"], r.text
    run()
    assert 200 in seen and (400 in seen or 422 in seen)
    ok = post(server, "/v1/chat/completions", {"model": "ad0", "messages": user(), "max_tokens": 2})
    assert ok.status_code == 200
