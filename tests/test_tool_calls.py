"""Tool calling in the gateway without a model: the parsers on canned hermes and llama3 texts, the
readers' streamed deltas (reassembled over every way of cutting the text into pieces) against the
whole answer, request validation, and the grammar of forced calls against `jsonschema`."""
from __future__ import annotations

import json
from types import SimpleNamespace

import jsonschema
import pytest

from loragate.gateway.errors import APIError
from loragate.gateway.protocol import ChatDelta
from loragate.gateway.structured import request_constraint
from loragate.gateway.tools import get_parser, plan_tools, reader_for
from loragate.gateway.tools.parsers import HermesParser, Llama3JsonParser
from loragate.gateway.tools.plan import closed_objects
from loragate.gateway.tools.reader import CallArrayReader, NamedCallReader, ParsedCallReader

TOOLS = {"get_weather", "search"}
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
           "required": ["city"]}


def tool(name, params=None, **fn):
    f = {"name": name, **fn}
    if params is not None:
        f["parameters"] = params
    return {"type": "function", "function": f}


# ---------------------------------------------------------------------------------------------- parsers
@pytest.mark.parametrize("text,content_end,calls", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', 0,
     [("get_weather", {"city": "Paris"})]),
    ('Let me look.\n<tool_call>{"name": "search", "arguments": {"q": "a</tool_call>b"}}</tool_call>', 13,
     None),  # a closing tag inside a string cuts the block: not valid JSON, so no calls
    ('<tool_call>{"name": "search", "arguments": "{\\"q\\": \\"x\\"}"}</tool_call>\n'
     '<tool_call>{"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}}', 0,
     [("search", {"q": "x"}), ("get_weather", {"city": "Oslo", "days": 2})]),  # text args; unclosed last
    ('<tool_call>{"name": "delete_all", "arguments": {}}</tool_call>', 0, None),  # not one of the tools
    ("<tool_call>{not json}</tool_call>", 0, None),
    ("no calls here", 0, None),
])
def test_hermes_parser(text, content_end, calls):
    out = HermesParser().parse(text, TOOLS)
    if calls is None:
        assert out is None
        return
    assert out.content_end == content_end
    assert [(c.name, json.loads(c.arguments)) for c in out.calls] == calls


@pytest.mark.parametrize("text,calls", [
    ('{"name": "get_weather", "parameters": {"city": "Rome"}}', [("get_weather", {"city": "Rome"})]),
    ('<|python_tag|>{"name": "search", "parameters": {"q": "x"}}; {"name": "get_weather", "arguments": {}}',
     [("search", {"q": "x"}), ("get_weather", {})]),
    ('  {"name": "search", "parameters": {"q": "é"}}\n', [("search", {"q": "é"})]),
    ('{"name": "search", "parameters": {"q": "x"}} and then prose', None),
    ('{"answer": 42}', None),
    ("The weather is fine.", None),
])
def test_llama3_json_parser(text, calls):
    out = Llama3JsonParser().parse(text, TOOLS)
    if calls is None:
        assert out is None
    else:
        assert out.content_end == 0
        assert [(c.name, json.loads(c.arguments)) for c in out.calls] == calls


def test_content_prefix_holds_back_only_what_may_be_a_call():
    h = HermesParser()
    assert h.content_prefix("Hello <tool") == len("Hello ")
    assert h.content_prefix("Hello <tool_call>{") == len("Hello ")
    assert h.content_prefix("a < b") == len("a < b")
    l3 = Llama3JsonParser()
    assert l3.content_prefix("  ") == 0 and l3.content_prefix(' {"na') == 0 and l3.content_prefix("<|pyth") == 0
    assert l3.content_prefix("Sure, {x}") == len("Sure, {x}")


# ---------------------------------------------------------------------------------------------- readers
def reassemble(deltas: list[ChatDelta]):
    """What a client's stream accumulator builds, checking the delta contract on the way."""
    content, calls = "", {}
    for d in deltas:
        content += d.content or ""
        for tc in d.tool_calls or []:
            wire = tc.model_dump()
            assert "function" in wire
            if tc.index not in calls:
                assert set(wire) == {"index", "id", "type", "function"} and wire["function"]["arguments"] == ""
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
            else:
                assert set(wire) == {"index", "function"} and set(wire["function"]) == {"arguments"}
                calls[tc.index]["arguments"] += tc.function.arguments
    return content or None, [calls[i] for i in sorted(calls)] or None


def pieces(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


def check_stream_equals_whole(make, text: str, reason: str = "stop"):
    whole = make()
    whole.feed(text)
    _, whole_reason = whole.finish(reason)
    expected = (whole.content, [(c.id, c.function.name, c.function.arguments) for c in whole.tool_calls or []])
    for size in (1, 2, 3, 7, len(text) or 1):
        r = make()
        deltas = [d for p in pieces(text, size) for d in r.feed(p)]
        more, got_reason = r.finish(reason)
        content, calls = reassemble(deltas + more)
        assert got_reason == whole_reason
        assert content == expected[0]
        assert [(c["name"], c["arguments"]) for c in calls or []] == [(n, a) for _, n, a in expected[1]]
    return whole, whole_reason


CALL_ARRAYS = [
    '[{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]',
    '[{"name": "search", "arguments": {"q": "a \\"quoted\\" {brace} [x], \\\\ and é 日本"}}, '
    '{"name": "get_weather", "arguments": {"city": "}{"}}]',
    '[ {"name" : "search" , "arguments" : {"q": {"nested": [1, {"a": "]"}]}}} ]',
]


@pytest.mark.parametrize("text", CALL_ARRAYS)
def test_call_array_reader_streams_raw_arguments(text):
    whole, reason = check_stream_equals_whole(CallArrayReader, text)
    expected = json.loads(text)
    assert reason == "tool_calls" and whole.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in whole.tool_calls] == \
        [(e["name"], e["arguments"]) for e in expected]


def test_call_array_reader_on_a_cut_answer_returns_the_partial_call():
    text = CALL_ARRAYS[1][:70]
    whole, reason = check_stream_equals_whole(CallArrayReader, text, "length")
    assert reason == "length"
    assert [c.function.name for c in whole.tool_calls] == ["search"]
    assert CALL_ARRAYS[1].startswith('[{"name": "search", "arguments": ' + whole.tool_calls[0].function.arguments)


def test_named_reader_announces_the_call_first():
    r = NamedCallReader("get_weather")
    first = r.feed("")
    assert first[0].tool_calls[0].function.name == "get_weather"
    check_stream_equals_whole(lambda: NamedCallReader("get_weather"), '{"city": "Paris"}')


@pytest.mark.parametrize("parser,text,n_calls,content", [
    (HermesParser(), 'Checking.\n<tool_call>\n{"name": "search", "arguments": {"q": "x"}}\n</tool_call>', 1,
     "Checking.\n"),
    (HermesParser(), '\n<tool_call>{"name": "search", "arguments": {}}</tool_call><tool_call>{"name": '
     '"get_weather", "arguments": {"city": "Lima"}}</tool_call>', 2, None),
    (HermesParser(), "Just words, and a < sign, no calls.", 0, "Just words, and a < sign, no calls."),
    (HermesParser(), "Broken <tool_call>{oops</tool_call>", 0, "Broken <tool_call>{oops</tool_call>"),
    (Llama3JsonParser(), '{"name": "search", "parameters": {"q": "x"}}', 1, None),
    (Llama3JsonParser(), "{not a call}", 0, "{not a call}"),
    (Llama3JsonParser(), "The answer is 4.", 0, "The answer is 4."),
])
def test_parsed_reader_stream_equals_whole(parser, text, n_calls, content):
    whole, reason = check_stream_equals_whole(lambda: ParsedCallReader(parser, TOOLS, True), text)
    assert len(whole.tool_calls or []) == n_calls and whole.content == content
    assert reason == ("tool_calls" if n_calls else "stop")


def test_parsed_reader_keeps_one_call_without_parallel_calls():
    text = '<tool_call>{"name": "search", "arguments": {}}</tool_call><tool_call>{"name": "search", "arguments": {}}'
    r = ParsedCallReader(HermesParser(), TOOLS, parallel=False)
    r.feed(text)
    r.finish("stop")
    assert len(r.tool_calls) == 1


# ---------------------------------------------------------------------------------------------- requests
def chat_req(**kw):
    base = dict(tools=None, tool_choice=None, parallel_tool_calls=None, response_format=None,
                structured_outputs=None, guided_json=None, guided_regex=None, guided_choice=None, guided_grammar=None)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("kw,param", [
    (dict(tools=[]), "tools"),
    (dict(tools=[tool("get_weather")], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (dict(tools=[{"type": "function", "function": {"description": "no name"}}]), "tools[0].function.name"),
    (dict(tools=[tool("bad name!")]), "tools[0].function.name"),
    (dict(tools=[tool("f", {"type": "array"})]), "tools[0].function.parameters"),
    (dict(tools=[tool("f", [1, 2])]), "tools[0].function.parameters"),
    (dict(tools=[tool("f"), tool("f")]), "tools[1].function.name"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=[tool("f")], tool_choice="sometimes"), "tool_choice"),
])
def test_bad_tool_requests_name_their_field(kw, param):
    with pytest.raises(APIError) as ei:
        plan_tools(chat_req(**kw), get_parser("hermes"), None)
    assert ei.value.status == 400 and ei.value.param == param


def test_a_schema_and_a_forced_tool_conflict():
    req = chat_req(tools=[tool("f")], tool_choice={"type": "function", "function": {"name": "f"}},
                   response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": WEATHER}})
    with pytest.raises(APIError) as ei:
        plan_tools(req, get_parser("hermes"), request_constraint(req))
    assert ei.value.param == "response_format.json_schema.schema" and "tool_choice" in ei.value.message


@pytest.mark.parametrize("kw,params", [
    (dict(response_format={"type": "json_object"}, guided_regex="a+"), ("response_format", "guided_regex")),
    (dict(structured_outputs={"regex": "a", "choice": ["a"]}), ("structured_outputs.regex",
                                                                 "structured_outputs.choice")),
])
def test_two_constraints_are_a_400_naming_both(kw, params):
    with pytest.raises(APIError) as ei:
        request_constraint(chat_req(**kw))
    assert all(p in ei.value.message for p in params) and ei.value.param == params[1]


@pytest.mark.parametrize("kw,kind,param", [
    (dict(response_format={"type": "text"}), None, None),
    (dict(response_format={"type": "json_object"}), "json", "response_format"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER, "strict": False}}),
     "json", "response_format.json_schema.schema"),
    (dict(structured_outputs={"json": json.dumps(WEATHER)}), "json", "structured_outputs.json"),
    (dict(structured_outputs={"choice": ["a", "b"], "regex": None}), "choice", "structured_outputs.choice"),
    (dict(guided_grammar='start: "x"'), "grammar", "guided_grammar"),
    (dict(guided_choice=["x"]), "choice", "guided_choice"),
])
def test_constraint_forms(kw, kind, param):
    c = request_constraint(chat_req(**kw))
    assert (c and c.spec.kind, c and c.param) == (kind, param)


def test_tool_arguments_are_closed_objects():
    loose = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}},
                                              "c": {"type": "array", "items": {"properties": {"d": {}}}},
                                              "e": {"anyOf": [{"properties": {}}, {"type": "string"}]},
                                              "f": {"type": "object"}},
             "$defs": {"G": {"properties": {"h": {}}}}}
    closed = closed_objects(loose)
    assert closed["additionalProperties"] is False
    props = closed["properties"]
    assert props["a"]["additionalProperties"] is False and props["c"]["items"]["additionalProperties"] is False
    assert props["e"]["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in props["e"]["anyOf"][1]
    assert "additionalProperties" not in props["f"]  # no declared properties: a free-form object stays free
    assert closed["$defs"]["G"]["additionalProperties"] is False
    assert "additionalProperties" not in loose  # the client's schema is not modified
    open_one = {"type": "object", "properties": {"x": {}}, "additionalProperties": True}
    assert closed_objects(open_one) == open_one  # an explicit choice is kept
    jsonschema.validate({"a": {"b": "x"}}, closed)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"a": {"b": "x", "extra": 1}}, closed)


def test_required_grammar_describes_valid_calls_only():
    tools = [tool("get_weather", WEATHER), tool("search", {"type": "object", "properties": {"q": {"type": "string"}},
                                                             "required": ["q"]}), tool("noop")]
    for parallel in (None, False):
        plan = plan_tools(chat_req(tools=tools, tool_choice="required", parallel_tool_calls=parallel),
                          get_parser("hermes"), None)
        schema = json.loads(plan.constraint.spec.value)
        one = [{"name": "get_weather", "arguments": {"city": "Paris"}}]
        two = one + [{"name": "noop", "arguments": {}}]
        jsonschema.validate(one, schema)
        for bad in ([], [{"name": "search", "arguments": {}}], [{"name": "noop", "arguments": {"x": 1}}],
                    [{"name": "other", "arguments": {}}]):
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate(bad, schema)
        if parallel is False:
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate(two, schema)
        else:
            jsonschema.validate(two, schema)
    named = plan_tools(chat_req(tools=tools, tool_choice={"type": "function", "function": {"name": "get_weather"}}),
                       get_parser("hermes"), None)
    assert json.loads(named.constraint.spec.value) == {**WEATHER, "additionalProperties": False}
    assert isinstance(reader_for(named), NamedCallReader)
    assert reader_for(plan_tools(chat_req(tools=tools, tool_choice="none"), get_parser("hermes"), None)) is None
