"""Reading one choice's generated text back as tool calls and content, incrementally.

A reader is fed the text as the engine produces it and returns the deltas to stream; the whole
(non-streamed) response is built from the very same reader fed all at once, so a reassembled
stream always equals the non-streamed answer. The three readers:

  NamedCallReader   tool_choice named: the text is the arguments object of that one function;
                    the call's first delta goes out at once, every piece of text is an arguments
                    fragment
  CallArrayReader   tool_choice required: the text is [{"name": ..., "arguments": {...}}, ...] (the
                    grammar fixes the key order); a small JSON scanner starts a call when its name
                    is complete and streams the raw text of its arguments as it comes
  ParsedCallReader  tool_choice auto: content streams at once until the text may be turning into a
                    call (the parser's marker, or its possible beginning); from there the rest is
                    held and parsed when the choice ends (calls, or else all of it as content)

Arguments are the model's own JSON text in the forced modes (the grammar guarantees it is valid,
unless max_tokens cut it: then the call is returned as far as it got, with finish_reason
"length", as OpenAI does); the auto parser re-serialises what it parsed.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from loragate.gateway.protocol import ChatDelta, DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall
from loragate.gateway.tools.parsers import ToolParser
from loragate.gateway.tools.plan import ToolPlan


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class _Call:
    id: str
    name: str
    arguments: str = ""


class ToolOutputReader:
    """Base: accumulates what it streamed (content and calls) for the whole-response view."""

    def __init__(self) -> None:
        self._content: list[str] = []
        self._calls: list[_Call] = []

    # ---- what subclasses emit ----
    def _text(self, text: str) -> list[ChatDelta]:
        if not text:
            return []
        self._content.append(text)
        return [ChatDelta(content=text)]

    def _start_call(self, name: str) -> list[ChatDelta]:
        call = _Call(new_call_id(), name)
        self._calls.append(call)
        first = DeltaToolCall(index=len(self._calls) - 1, id=call.id, type="function",
                              function=DeltaFunctionCall(name=name, arguments=""))
        return [ChatDelta(tool_calls=[first])]

    def _arguments(self, fragment: str) -> list[ChatDelta]:
        if not fragment:
            return []
        self._calls[-1].arguments += fragment
        return [ChatDelta(tool_calls=[DeltaToolCall(index=len(self._calls) - 1,
                                                    function=DeltaFunctionCall(arguments=fragment))])]

    # ---- the interface ----
    def feed(self, text: str) -> list[ChatDelta]:
        raise NotImplementedError

    def finish(self, reason: str | None) -> tuple[list[ChatDelta], str | None]:
        """The last deltas and the choice's finish_reason ("tool_calls" when calls came back and
        generation stopped by itself)."""
        return [], self.finish_reason(reason)

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if self._calls and reason == "stop" else reason

    @property
    def content(self) -> str | None:
        return "".join(self._content) or None

    @property
    def tool_calls(self) -> list[ToolCall] | None:
        if not self._calls:
            return None
        return [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in self._calls]


class NamedCallReader(ToolOutputReader):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def feed(self, text: str) -> list[ChatDelta]:
        out = [] if self._calls else self._start_call(self.name)
        return out + self._arguments(text)


class CallArrayReader(ToolOutputReader):
    """Scans `[{"name": "<n>", "arguments": <object>}, ...]` (any JSON whitespace) char by char,
    keeping JSON string and nesting state across pieces."""

    def __init__(self) -> None:
        super().__init__()
        self._buf = ""
        self._depth = 0
        self._in_str = False
        self._escape = False
        self._str_start = 0
        self._expect_key = False
        self._key: str | None = None
        self._args_from: int | None = None  # where the current call's arguments begin
        self._args_sent = 0  # how far they were streamed
        self._args_open = False

    def feed(self, text: str) -> list[ChatDelta]:
        out: list[ChatDelta] = []
        start = len(self._buf)
        self._buf += text
        for i in range(start, len(self._buf)):
            c = self._buf[i]
            if self._in_str:
                if self._escape:
                    self._escape = False
                elif c == "\\":
                    self._escape = True
                elif c == '"':
                    self._in_str = False
                    if self._depth == 2 and not self._args_open:
                        out += self._string_done(json.loads(self._buf[self._str_start:i + 1]))
                continue
            if c == '"':
                self._in_str, self._str_start = True, i
            elif c in "{[":
                if self._depth == 2 and self._key == "arguments" and not self._expect_key and self._calls \
                        and self._args_from is None:
                    self._args_from = self._args_sent = i
                    self._args_open = True
                self._depth += 1
                if self._depth == 2 and c == "{":  # a call object opens
                    self._expect_key, self._key, self._args_from = True, None, None
            elif c in "}]":
                self._depth -= 1
                if self._args_open and self._depth == 2:  # the arguments value closed
                    out += self._arguments(self._buf[self._args_sent:i + 1])
                    self._args_sent, self._args_open = i + 1, False
            elif c == "," and self._depth == 2 and not self._args_open:
                self._expect_key = True
        if self._args_open:
            out += self._arguments(self._buf[self._args_sent:])
            self._args_sent = len(self._buf)
        return out

    def _string_done(self, value: str) -> list[ChatDelta]:
        if self._expect_key:
            self._key, self._expect_key = value, False
            return []
        if self._key == "name":
            return self._start_call(value)
        return []


class ParsedCallReader(ToolOutputReader):
    def __init__(self, parser: ToolParser, tools: set[str], parallel: bool) -> None:
        super().__init__()
        self.parser, self.tools, self.parallel = parser, tools, parallel
        self._text_so_far = ""
        self._sent = 0

    def feed(self, text: str) -> list[ChatDelta]:
        self._text_so_far += text
        safe = self.parser.content_prefix(self._text_so_far)
        # whitespace before a call is not content: send nothing until real text is there
        if safe > self._sent and self._text_so_far[:safe].strip():
            out = self._text(self._text_so_far[self._sent:safe])
            self._sent = safe
            return out
        return []

    def finish(self, reason: str | None) -> tuple[list[ChatDelta], str | None]:
        text = self._text_so_far
        parsed = self.parser.parse(text, self.tools)
        if parsed is None:
            return self._text(text[self._sent:]), reason
        out: list[ChatDelta] = []
        if text[:parsed.content_end].strip():
            out += self._text(text[self._sent:parsed.content_end])
        for call in parsed.calls[: None if self.parallel else 1]:
            out += self._start_call(call.name) + self._arguments(call.arguments)
        return out, self.finish_reason(reason)


def reader_for(plan: ToolPlan) -> ToolOutputReader | None:
    """The reader of a plan's output; None when the output is plain content (no tools, or none)."""
    if plan.mode == "named":
        return NamedCallReader(plan.named or "")
    if plan.mode == "required":
        return CallArrayReader()
    if plan.mode == "auto" and plan.parser is not None:
        return ParsedCallReader(plan.parser, plan.names, plan.parallel)
    return None
