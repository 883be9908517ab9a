"""`tools` + `tool_choice` + `parallel_tool_calls` -> a `ToolPlan`: what the chat template sees,
whether a grammar forces calls, and how the output is read back.

  none      the tools are shown to the model (the template gets them) but never called; output is
            content
  auto      the default when tools are given: the model decides; its text is parsed by the
            server's `--tool-call-parser`, and text that is not calls stays content
  required  a grammar forces a JSON array of calls [{"name": ..., "arguments": {...}}, ...] (one
            call when parallel_tool_calls is false), each call's arguments valid for its tool's
            `parameters` schema: any model, even an untrained one, answers with well-formed calls
  named     {"type": "function", "function": {"name": N}}: a grammar forces exactly the arguments
            object of N

In both forced modes the arguments never carry undeclared keys: an object in `parameters` that
lists properties and says nothing about additionalProperties is closed, as OpenAI's strict mode
requires and vLLM's disable_additional_properties does (a function called with an unknown
keyword fails, and an untrained model would otherwise invent keys until max_tokens).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from loragate.engine.structured import StructuredSpec
from loragate.gateway.errors import bad_request, unsupported
from loragate.gateway.structured import Constraint
from loragate.gateway.tools.parsers import ToolParser

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}

Mode = Literal["none", "auto", "required", "named"]


@dataclass
class ToolPlan:
    mode: Mode
    tools: list[dict[str, Any]]  # as the client sent them: what the chat template receives
    parameters: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> arguments schema
    named: str | None = None
    parallel: bool = True
    constraint: Constraint | None = None  # the grammar of required / named
    parser: ToolParser | None = None  # the reader of auto

    @property
    def names(self) -> set[str]:
        return set(self.parameters)

    @property
    def forced(self) -> bool:
        """The grammar makes the whole output tool calls (no content)."""
        return self.mode in ("required", "named")


_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")


def closed_objects(schema: Any) -> Any:
    """A copy of `schema` where objects that list properties and leave additionalProperties unset
    get additionalProperties: false."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: closed_objects(v) for k, v in out[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(v) for v in out[key]]
    for key in ("items", "additionalProperties", "not", "if", "then", "else"):
        if isinstance(out.get(key), dict):
            out[key] = closed_objects(out[key])
    return out


def _parameters(fn: dict[str, Any], i: int) -> dict[str, Any]:
    params = fn.get("parameters")
    param = f"tools[{i}].function.parameters"
    if params is None or params == {}:
        return dict(NO_ARGUMENTS)  # a function without parameters takes the empty object
    if not isinstance(params, dict) or params.get("type", "object") != "object":
        raise bad_request(f"{param} must be a JSON schema of type object", param, "invalid_tool")
    return params


def _validate_tools(tools: list[Any]) -> dict[str, dict[str, Any]]:
    if not tools:
        raise bad_request("tools must not be empty; leave it out instead", "tools")
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise bad_request(f"tools[{i}] must be an object", f"tools[{i}]", "invalid_tool")
        if tool.get("type", "function") != "function":
            raise unsupported(f"tools[{i}].type", f"tools of type {tool.get('type')!r}")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise bad_request(f"tools[{i}].function must be an object", f"tools[{i}].function", "invalid_tool")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise bad_request(f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-'",
                              f"tools[{i}].function.name", "invalid_tool")
        if name in out:
            raise bad_request(f"tools[{i}].function.name {name!r} is given twice", f"tools[{i}].function.name",
                              "invalid_tool")
        out[name] = _parameters(fn, i)
    return out


def _choice(tool_choice: Any, names: set[str]) -> tuple[Mode, str | None]:
    if tool_choice is None or tool_choice == "auto":
        return "auto", None
    if tool_choice in ("none", "required"):
        return tool_choice, None
    if isinstance(tool_choice, dict) and tool_choice.get("type", "function") == "function":
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise bad_request("tool_choice.function.name is required", "tool_choice")
        if name not in names:
            raise bad_request(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
        return "named", name
    raise bad_request('tool_choice must be "none", "auto", "required" or {"type": "function", '
                      '"function": {"name": ...}}', "tool_choice")


def call_schema(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """One call as the required-mode grammar writes it: name first, then the arguments."""
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def required_schema(parameters: dict[str, dict[str, Any]], parallel: bool) -> dict[str, Any]:
    calls = [call_schema(n, p) for n, p in parameters.items()]
    schema: dict[str, Any] = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
                              "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def plan_tools(req: Any, parser: ToolParser, output_constraint: Constraint | None) -> ToolPlan | None:
    """The request's tool plan (None without tools); every invalid combination is a 400."""
    if req.tools is None:
        if req.tool_choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return None
    parameters = _validate_tools(req.tools)
    mode, named = _choice(req.tool_choice, set(parameters))
    plan = ToolPlan(mode, list(req.tools), parameters, named, parallel=req.parallel_tool_calls is not False)
    if plan.forced and output_constraint is not None:
        raise bad_request(f"`{output_constraint.param}` and a tool_choice of {mode} both constrain the whole "
                          "output; send one of them", output_constraint.param, "conflicting_constraints")
    closed = {name: closed_objects(p) for name, p in parameters.items()}
    if mode == "named":
        i = list(parameters).index(named)
        plan.constraint = Constraint(StructuredSpec.json(closed[named]), f"tools[{i}].function.parameters")
    elif mode == "required":
        plan.constraint = Constraint(StructuredSpec.json(required_schema(closed, plan.parallel)), "tools")
    elif mode == "auto":
        plan.parser = parser
    return plan
