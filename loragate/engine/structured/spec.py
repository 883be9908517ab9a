"""`StructuredSpec`: the one engine-facing description of an output constraint.

Every API that constrains output (OpenAI `response_format`, vLLM `structured_outputs` and its
`guided_*` aliases, tool calling with `tool_choice` required or named, LoRAX `response_format`)
is translated by its gateway route into one of these and set as `SamplingParams.structured`. The
engine knows nothing else about where a constraint came from.

kinds and values:
  json     the JSON schema as JSON text (`StructuredSpec.json(schema_dict)` serialises a dict,
           keeping its key order: properties are generated in the order the schema lists them)
  regex    a regular expression the whole output must match (Rust `regex` syntax, which is
           close to Python's for everything but look-around and back-references)
  choice   a tuple of strings; the output is exactly one of them
  grammar  a Lark grammar (llguidance's dialect) or a GBNF grammar (llama.cpp's), starting at
           `start` / `root`

The spec is frozen and hashable: it is the key of the engine's compiled-grammar cache.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

StructuredKind = Literal["json", "regex", "choice", "grammar"]
KINDS: tuple[str, ...] = ("json", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredSpec:
    kind: StructuredKind
    value: str | tuple[str, ...]

    @classmethod
    def json(cls, schema: dict[str, Any] | str) -> StructuredSpec:
        """A JSON-schema constraint; a dict is serialised compactly with its key order kept."""
        if not isinstance(schema, str):
            schema = json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
        return cls("json", schema)

    @classmethod
    def choice(cls, options: list[str] | tuple[str, ...]) -> StructuredSpec:
        return cls("choice", tuple(options))

    def validate(self) -> None:
        """Shape checks only (types, emptiness); whether the grammar compiles is the compiler's
        business. Raises ValueError."""
        if self.kind not in KINDS:
            raise ValueError(f"structured output kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "choice":
            if not isinstance(self.value, tuple) or not self.value:
                raise ValueError("choice needs a non-empty list of strings")
            if not all(isinstance(v, str) for v in self.value):
                raise ValueError("choice options must be strings")
        elif not isinstance(self.value, str) or not self.value.strip():
            raise ValueError(f"{self.kind} constraint must be a non-empty string")
