"""What the engine holds for structured outputs: a `SequenceGrammar` per constrained sequence and
one `StructuredRuntime` that attaches them, builds the step's bitmask and advances matchers.

Life of a constrained sequence:
  add_request   attach(spec): the compile is submitted (or found in the cache) at once
  scheduling    the scheduler admits it only once `ready()`: its grammar compiled and its matcher
                agrees with the tokens kept so far (a preempted sequence keeps its output and is
                recomputed, so this is normally a no-op; otherwise the matcher is rebuilt from them)
  each step     bitmask(sampled) fills masks for the constrained rows only (None when there are
                none: unconstrained batches do no extra work); the sampler applies it first
  each token    accept(tok); the sequence ends as soon as the matcher is terminated
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from loragate.engine.structured.backend import GrammarBackend, Matcher, bitmask_words
from loragate.engine.structured.bitmask import TokenBitmask
from loragate.engine.structured.compiler import GrammarCompiler
from loragate.engine.structured.spec import StructuredSpec

if TYPE_CHECKING:
    from loragate.engine.sequence import Sequence as EngineSequence


@dataclass
class SequenceGrammar:
    """One sequence's constraint: the compile future, then its matcher and how many tokens the
    matcher has consumed."""

    future: Future
    matcher: Matcher | None = None
    consumed: int = 0
    error: str | None = field(default=None)

    def ready(self, output_ids: list[int]) -> bool:
        """True once the matcher exists and has consumed exactly `output_ids`. False while the
        compile runs, or when it failed (then `error` says why)."""
        if self.matcher is None:
            if not self.future.done():
                return False
            exc = self.future.exception()
            if exc is not None:
                self.error = str(exc) or type(exc).__name__
                return False
            self.matcher = self.future.result().matcher()
        if self.consumed != len(output_ids):
            self.matcher.reset()
            self.consumed = 0
            for tok in output_ids:
                if not self.matcher.accept(tok):
                    self.error = "the kept output no longer matches its grammar"
                    return False
                self.consumed += 1
        return True

    def accept(self, token_id: int) -> bool:
        assert self.matcher is not None
        ok = self.matcher.accept(token_id)
        if ok:
            self.consumed += 1
        return ok

    @property
    def terminated(self) -> bool:
        return self.matcher is not None and self.matcher.is_terminated


class StructuredRuntime:
    """The engine's structured-output state: the compiler and the per-step bitmask."""

    def __init__(self, make_backend: Callable[[], GrammarBackend], capacity: int = 512) -> None:
        self.compiler = GrammarCompiler(make_backend, capacity)

    def attach(self, spec: StructuredSpec) -> SequenceGrammar:
        return SequenceGrammar(self.compiler.submit(spec))

    def bitmask(self, seqs: Sequence[EngineSequence]) -> TokenBitmask | None:
        """Masks for the rows of `seqs` that carry a grammar; None when none does."""
        rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
        if not rows:
            return None
        backend = self.compiler.backend
        out = torch.empty(len(rows), bitmask_words(backend.vocab_size), dtype=torch.int32)
        backend.fill_bitmask([seqs[i].grammar.matcher for i in rows], out)
        return TokenBitmask(rows, out)

    def shutdown(self) -> None:
        self.compiler.shutdown()
