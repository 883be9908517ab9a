"""The grammar backend interface: all the engine needs from a constrained-decoding library.

A backend compiles a `StructuredSpec` into a `Grammar` (slow: done on the compiler's worker
thread, cached), hands out one `Matcher` per sequence (cheap), and fills the step's token bitmask
for a list of matchers at once (so a backend can do it in parallel). llguidance is the one
implementation (`llg.py`); a test can substitute its own.

Bitmask layout (the same as llguidance's, xgrammar's and vLLM's): int32 words, bit `t % 32` of
word `t // 32` set when token `t` is allowed; one row per constrained sequence.
"""
from __future__ import annotations

from typing import Protocol

import torch

from loragate.engine.structured.spec import StructuredSpec


class GrammarError(ValueError):
    """The spec is not a valid grammar (bad schema, regex or grammar text), or is too complex."""


class Matcher(Protocol):
    """The parse state of one sequence's output so far."""

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False if the grammar does not allow it (the matcher is
        then unusable: the engine ends the sequence)."""

    def reset(self) -> None:
        """Back to the start, as if no token had been accepted."""

    @property
    def is_terminated(self) -> bool:
        """The output is complete: the grammar allows no further token (EOS aside)."""

    def is_accepting(self) -> bool:
        """The output so far is a complete match (it may end here, though it could go on)."""


class Grammar(Protocol):
    """A compiled spec: immutable, shared by every sequence with the same spec."""

    def matcher(self) -> Matcher: ...


class GrammarBackend(Protocol):
    vocab_size: int  # bitmask width in tokens (the model's vocabulary, padding included)

    def compile(self, spec: StructuredSpec) -> Grammar:
        """Slow; raises GrammarError. Called on a worker thread, never on the step loop."""

    def fill_bitmask(self, matchers: list[Matcher], bitmask: torch.Tensor) -> None:
        """Write row i of `bitmask` (int32 [len(matchers), words], CPU, contiguous) for matchers[i]."""


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def llguidance_backend(tokenizer, vocab_size: int, eos_ids: list[int]) -> GrammarBackend:
    """The default backend (`llg.py`), for a `GrammarCompiler`'s factory: it runs on the first compile
    job, and llguidance is imported only then, so an engine that never sees a constrained request
    does not need it (e.g. a CUDA image with the engine's dependencies only)."""
    from loragate.engine.structured.llg import LLGuidanceBackend

    return LLGuidanceBackend.create(tokenizer, vocab_size, eos_ids)
