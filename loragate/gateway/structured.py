"""Output constraints from the request -> the engine's `StructuredSpec`, checked and compiled before
any engine work.

Accepted forms (one per request; two are a 400 naming both fields):
  response_format   {"type": "text"} (no constraint), {"type": "json_object"} (any JSON object),
                    {"type": "json_schema", "json_schema": {"name", "schema", "strict"?, ...}}:
                    the output follows the schema whether `strict` is true or false
  structured_outputs  vLLM's form: {"json": schema} | {"regex": str} | {"choice": [str, ...]} |
                    {"grammar": Lark or GBNF text} | {"json_object": true}
  guided_json, guided_regex, guided_choice, guided_grammar   vLLM's older top-level aliases

`compile_constraint` asks the engine to compile the spec (its grammar threads, its cache) and waits
at most `GatewaySettings.grammar_compile_timeout` seconds: an invalid grammar or one too slow to
compile is a 400 naming its field, and the request never reaches the engine's queue.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from loragate.engine.structured import GrammarError, StructuredSpec
from loragate.gateway.errors import APIError, bad_request, unsupported

ANY_OBJECT = {"type": "object"}
_VLLM_KINDS = ("json", "regex", "choice", "grammar")
_MAX_ERROR = 600  # characters of a compiler message passed back to the client


@dataclass(frozen=True)
class Constraint:
    """A spec and the request field it came from (the `param` of its errors)."""

    spec: StructuredSpec
    param: str


def _schema(value: Any, param: str) -> StructuredSpec:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise bad_request(f"{param} is not valid JSON: {exc}", param, "invalid_json_schema") from None
    if not isinstance(value, dict):
        raise bad_request(f"{param} must be a JSON schema object", param, "invalid_json_schema")
    return StructuredSpec.json(value)


def _typed(kind: str, value: Any, param: str) -> StructuredSpec:
    """A vLLM-style constraint of `kind` (json | regex | choice | grammar)."""
    if kind == "json":
        return _schema(value, param)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise bad_request(f"{param} must be a non-empty list of strings", param)
        return StructuredSpec.choice(value)
    if not isinstance(value, str) or not value.strip():
        raise bad_request(f"{param} must be a non-empty string", param)
    return StructuredSpec(kind, value)  # type: ignore[arg-type]


def _response_format(rf: Any) -> Constraint | None:
    if not isinstance(rf, dict):
        raise bad_request("response_format must be an object", "response_format")
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint(StructuredSpec.json(ANY_OBJECT), "response_format")
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise bad_request("response_format.json_schema must be an object", "response_format.json_schema")
        if "schema" not in js:
            raise bad_request("response_format.json_schema.schema is required", "response_format.json_schema.schema")
        param = "response_format.json_schema.schema"
        return Constraint(_schema(js["schema"], param), param)
    raise unsupported("response_format.type", f"response_format type {kind!r}")


def request_constraint(req: Any) -> Constraint | None:
    """The request's one output constraint, if any; malformed or multiple constraints are 400s."""
    found: list[Constraint] = []
    rf = getattr(req, "response_format", None)
    if rf is not None and (c := _response_format(rf)) is not None:
        found.append(c)
    so = getattr(req, "structured_outputs", None)
    if so is not None:
        for key, value in so.items():
            if value is None or value is False:
                continue
            param = f"structured_outputs.{key}"
            if key in _VLLM_KINDS:
                found.append(Constraint(_typed(key, value, param), param))
            elif key == "json_object":
                found.append(Constraint(StructuredSpec.json(ANY_OBJECT), param))
            else:
                raise unsupported(param, f"structured_outputs.{key}")
    for kind in _VLLM_KINDS:
        value = getattr(req, f"guided_{kind}", None)
        if value is not None:
            found.append(Constraint(_typed(kind, value, f"guided_{kind}"), f"guided_{kind}"))
    if len(found) > 1:
        names = " and ".join(f"`{c.param}`" for c in found)
        raise bad_request(f"a request takes one output constraint, but {names} were both given", found[1].param,
                          "conflicting_constraints")
    return found[0] if found else None


async def compile_constraint(engine: Any, c: Constraint, timeout: float) -> None:
    """Compile on the engine's grammar threads, at most `timeout` seconds; errors are 400s. An
    engine without `compile_grammar` (a stand-in) is trusted to report errors itself."""
    compile_grammar = getattr(engine, "compile_grammar", None)
    if compile_grammar is None:
        return
    try:
        await asyncio.wait_for(compile_grammar(c.spec), timeout)
    except asyncio.TimeoutError:
        raise APIError(400, f"the {c.param} grammar could not be compiled within {timeout:g} s; simplify it",
                       "invalid_request_error", c.param, "grammar_too_complex") from None
    except GrammarError as exc:
        message = str(exc).strip()
        if len(message) > _MAX_ERROR:
            message = message[:_MAX_ERROR] + "..."
        raise bad_request(f"invalid {c.param}: {message}", c.param, "invalid_grammar") from None
