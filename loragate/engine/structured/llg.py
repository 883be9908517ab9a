"""The llguidance backend: JSON schema, regex, choice and Lark/GBNF grammars over the model's own
vocabulary, with masks computed in native code (in parallel across rows by llguidance's executor).

The llguidance tokenizer is built from the same files the engine tokenizes with (tokenizer.json,
or the tiktoken ranks and pattern), so masks agree with what decoding produces. JSON is generated
with Python's default separators (", " and ": ") and no other whitespace: deterministic, close to
what models saw in training, and a model cannot spend its whole budget on whitespace. A schema can
still choose otherwise through llguidance's "x-guidance" options.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import llguidance as llg
import torch

from loragate.engine.structured.backend import GrammarError, bitmask_words
from loragate.engine.structured.spec import StructuredSpec
from loragate.engine.tokenizer import Tokenizer, _HFBackend, _TiktokenBackend

JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def ll_tokenizer(tokenizer: Tokenizer, vocab_size: int, eos_ids: list[int]) -> llg.LLTokenizer:
    """The llguidance view of `tokenizer` over `vocab_size` ids (ids past the tokenizer's own
    vocabulary, e.g. a padded lm_head, are never allowed). Expensive for big vocabularies (~1 s):
    built once, on the compiler's worker thread."""
    backend = tokenizer.backend
    n_vocab = max(vocab_size, tokenizer.vocab_size)
    if isinstance(backend, _HFBackend):
        return llg.LLTokenizer(backend.tok.to_str(), n_vocab=n_vocab, eos_token=eos_ids)
    if isinstance(backend, _TiktokenBackend):
        return llg.LLTokenizer.from_tiktoken(encoder=backend.ranks, special_tokens=backend.specials,
                                             pattern=backend.enc._pat_str, eos_token=eos_ids, n_vocab=n_vocab)
    raise GrammarError(f"structured outputs do not support the tokenizer backend {type(backend).__name__}")


def grammar_text(spec: StructuredSpec) -> str:
    """The llguidance grammar for a spec; GrammarError when the spec text itself is malformed."""
    try:
        if spec.kind == "json":
            return llg.LLMatcher.grammar_from_json_schema(spec.value, defaults=JSON_DEFAULTS)
        if spec.kind == "regex":
            return llg.LLMatcher.grammar_from_regex(spec.value)
        if spec.kind == "choice":
            return llg.grammar_from("choice", json.dumps(list(spec.value)))
        if spec.kind == "grammar":
            return llg.grammar_from("grammar", spec.value)
    except ValueError as exc:
        raise GrammarError(str(exc)) from None
    raise GrammarError(f"unknown structured output kind {spec.kind!r}")


class LLGMatcher:
    """One sequence's llguidance matcher."""

    __slots__ = ("m",)

    def __init__(self, m: llg.LLMatcher) -> None:
        self.m = m

    def accept(self, token_id: int) -> bool:
        # a refused token puts an llguidance matcher in a permanent error state; the engine ends
        # the sequence when that happens, so the matcher is never used again
        return self.m.consume_token(token_id)

    def reset(self) -> None:
        self.m.reset()

    @property
    def is_terminated(self) -> bool:
        return self.m.is_stopped()

    def is_accepting(self) -> bool:
        return self.m.is_accepting()


@dataclass
class LLGGrammar:
    prototype: llg.LLMatcher  # never advanced; copied for each sequence

    def matcher(self) -> LLGMatcher:
        return LLGMatcher(self.prototype.deep_copy())


@dataclass
class LLGuidanceBackend:
    """Build with `LLGuidanceBackend.create(tokenizer, vocab_size, eos_ids)` (slow; worker thread)."""

    tokenizer: llg.LLTokenizer
    vocab_size: int  # llguidance's vocabulary: max(model, tokenizer); the mask width
    _executor: llg.LLExecutor | None = field(default=None, repr=False)

    @classmethod
    def create(cls, tokenizer: Tokenizer, vocab_size: int, eos_ids: list[int]) -> LLGuidanceBackend:
        llt = ll_tokenizer(tokenizer, vocab_size, sorted(eos_ids))
        return cls(llt, llt.vocab_size)

    def compile(self, spec: StructuredSpec) -> LLGGrammar:
        m = llg.LLMatcher(self.tokenizer, grammar_text(spec), log_level=0)
        if m.is_error():
            raise GrammarError(m.get_error())
        return LLGGrammar(m)

    def fill_bitmask(self, matchers: list[LLGMatcher], bitmask: torch.Tensor) -> None:
        words = bitmask_words(self.vocab_size)
        assert bitmask.dtype == torch.int32 and bitmask.is_contiguous() and bitmask.device.type == "cpu"
        assert bitmask.shape == (len(matchers), words)
        if len(matchers) == 1:  # no thread hand-off for a single row
            matchers[0].m.unsafe_compute_mask_ptr(bitmask.data_ptr(), words * 4)
            return
        if self._executor is None:
            self._executor = llg.LLExecutor()
        self._executor.unsafe_compute_mask_ptr([(mt.m, i) for i, mt in enumerate(matchers)], bitmask.data_ptr(),
                                               words * 4, len(matchers))
