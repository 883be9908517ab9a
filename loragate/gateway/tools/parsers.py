"""Tool-call parsers for `tool_choice: "auto"`: the model's text -> (content, calls), chosen by
`--tool-call-parser`. Each parser also says how much of a partial text is certainly content, so a
stream can send content at once and hold back only what may become a call.

  hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call>, one block per call, any
               text before the first block is content (Hermes, Qwen 2/2.5/3 and many fine-tunes)
  llama3_json  the whole answer is one or more {"name": ..., "parameters": {...}} objects,
               separated by ";" and optionally led by <|python_tag|> (Llama 3.1+ JSON tool calls)

A text that does not parse completely as calls of known tools is content, whole: a model that
answers in prose is never turned into a half-parsed call.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text of an object


@dataclass(frozen=True)
class ParsedOutput:
    content_end: int  # text[:content_end] is the content (whitespace-only content counts as none)
    calls: list[ParsedCall]


class ToolParser(Protocol):
    name: str

    def content_prefix(self, text: str) -> int:
        """Length of the prefix of a partial `text` that cannot be part of a call."""

    def parse(self, text: str, tools: set[str]) -> ParsedOutput | None:
        """The calls in a complete `text`, or None when it is not (only) calls of `tools`."""


def _call(obj: object, tools: set[str], args_keys: tuple[str, ...]) -> ParsedCall | None:
    """{"name": known tool, <args key>: object or JSON text of one} -> ParsedCall."""
    if not isinstance(obj, dict) or obj.get("name") not in tools:
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _partial_marker(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class HermesParser:
    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"

    def content_prefix(self, text: str) -> int:
        i = text.find(self.START)
        return i if i >= 0 else len(text) - _partial_marker(text, self.START)

    def parse(self, text: str, tools: set[str]) -> ParsedOutput | None:
        first = text.find(self.START)
        if first < 0:
            return None
        calls, pos = [], first
        while (start := text.find(self.START, pos)) >= 0:
            body_from = start + len(self.START)
            end = text.find(self.END, body_from)
            body = text[body_from:] if end < 0 else text[body_from:end]  # the last block may be unclosed
            try:
                call = _call(json.loads(body.strip()), tools, ("arguments", "parameters"))
            except json.JSONDecodeError:
                return None
            if call is None:
                return None
            calls.append(call)
            if end < 0:
                break
            pos = end + len(self.END)
        return ParsedOutput(first, calls)


class Llama3JsonParser:
    name = "llama3_json"
    TAG = "<|python_tag|>"

    def content_prefix(self, text: str) -> int:
        s = text.lstrip()
        if not s or s.startswith("{") or s.startswith(self.TAG) or self.TAG.startswith(s):
            return 0  # may be (the start of) a call: hold it all
        return len(text)

    def parse(self, text: str, tools: set[str]) -> ParsedOutput | None:
        s = text.strip()
        if s.startswith(self.TAG):
            s = s[len(self.TAG):].lstrip()
        decoder, calls, pos = json.JSONDecoder(), [], 0
        while pos < len(s):
            try:
                obj, pos = decoder.raw_decode(s, pos)
            except json.JSONDecodeError:
                return None
            call = _call(obj, tools, ("parameters", "arguments"))
            if call is None:
                return None
            calls.append(call)
            while pos < len(s) and (s[pos].isspace() or s[pos] == ";"):
                pos += 1
        return ParsedOutput(0, calls) if calls else None


PARSERS: dict[str, type] = {"hermes": HermesParser, "llama3_json": Llama3JsonParser}


def get_parser(name: str) -> ToolParser:
    try:
        return PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r} (known: {', '.join(PARSERS)})") from None
