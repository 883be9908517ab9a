"""Structured outputs in the engine: constrain a sequence's tokens to a grammar.

`spec.py` is the request-side description (`StructuredSpec`, set as `SamplingParams.structured`);
`backend.py` the small interface a grammar library implements (llguidance in `llg.py`);
`compiler.py` compiles specs on worker threads with an LRU cache; `runtime.py` holds the
per-sequence matchers and builds each step's bitmask; `bitmask.py` applies it to the logits.
Tool-call formats and parsing are gateway work: the engine only knows grammars.
"""
from loragate.engine.structured.backend import GrammarError
from loragate.engine.structured.spec import StructuredSpec

__all__ = ["GrammarError", "StructuredSpec"]
