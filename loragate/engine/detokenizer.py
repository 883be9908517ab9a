"""Incremental detokenization of one generated sequence, with stop strings.

The engine pushes each sampled token and streams the returned delta. Two things are held back:
an unfinished UTF-8 character (a decode that ends in U+FFFD because the token split a character),
and a tail that could still grow into a stop string. Decoding re-reads only a short window of recent
tokens (vLLM's prefix/read offsets): decode(window) minus decode(window's already-emitted head) is
the new text, so each push costs O(window), not O(sequence length), and leading-space rules
(sentencepiece's start strip, byte-level merges) come out as in a full decode.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

REPLACEMENT = "\ufffd"
# Prompt tokens kept as left context for the first generated tokens.
PREFIX_CONTEXT = 6
# Give up waiting for a character to complete after this many tokens (a genuinely invalid byte
# sequence would otherwise grow the window, and the per-token cost, without bound).
MAX_PENDING = 32


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


@dataclass
class _Window:
    """Token ids with two offsets: ids[prefix:read] were emitted last time (left context for the
    decoder), ids[read:] are not emitted yet."""

    ids: list[int]
    prefix: int
    read: int
    prefix_text: str | None = None  # cached decode of ids[prefix:read]


@dataclass
class TextStream:
    """Detokenizes one sequence incrementally and applies stop strings. `push` each sampled token;
    call `finish` when the sequence ends for another reason (length, EOS)."""

    tokenizer: _Decoder
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prefix_ids: list[int] | None = None
    text: str = field(default="", init=False)  # everything emitted so far
    stopped: bool = field(default=False, init=False)
    _held: str = field(default="", init=False)  # decoded but not yet emitted (possible stop start)
    _win: _Window = field(init=False)

    def __post_init__(self) -> None:
        self.stop = [s for s in self.stop if s]
        ids = list(self.prefix_ids or [])
        context = ids[max(0, len(ids) - PREFIX_CONTEXT):]
        self._win = _Window(ids=context, prefix=0, read=len(context))
        self._max_stop = max((len(s) for s in self.stop), default=0)

    # ---- public -------------------------------------------------------------------------------
    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token. Returns (text safe to emit now, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        self._win.ids.append(token_id)
        return self._emit(self._decode_new(final=False))

    def finish(self) -> str:
        """Everything still held back, at the end of the sequence (incomplete characters included)."""
        if self.stopped:
            return ""
        delta, stopped = self._emit(self._decode_new(final=True))
        if not stopped:
            delta += self._held
            self.text += self._held
            self._held = ""
        self.stopped = True
        return delta

    # ---- detokenization -----------------------------------------------------------------------
    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_new(self, final: bool) -> str:
        """Text added by the tokens after the read offset, once it is complete."""
        w = self._win
        if w.read == len(w.ids):
            return ""
        if w.prefix_text is None:
            w.prefix_text = self._decode(w.ids[w.prefix:w.read])
        new_text = self._decode(w.ids[w.prefix:])
        pending = len(w.ids) - w.read
        if not final and pending < MAX_PENDING and (
            new_text.endswith(REPLACEMENT) or len(new_text) <= len(w.prefix_text)
        ):
            return ""  # mid-character, or nothing visible yet: wait for more tokens
        delta = new_text[len(w.prefix_text):]
        w.prefix, w.read, w.prefix_text = w.read, len(w.ids), None
        return delta

    # ---- stop strings -------------------------------------------------------------------------
    def _emit(self, new: str) -> tuple[str, bool]:
        """Append `new` to the held text, cut at the first stop string, and release what can no
        longer be part of one."""
        held = self._held + new
        if not self.stop:
            self._held = ""
            self.text += held
            return held, False
        # Emitted text never contains the start of a stop string, so searching `held` is enough.
        hit = min(((i, -len(s)) for s in self.stop if (i := held.find(s)) >= 0), default=None)
        if hit is not None:
            end = hit[0] - hit[1] if self.include_stop_str_in_output else hit[0]
            delta, self._held, self.stopped = held[:end], "", True
            self.text += delta
            return delta, True
        keep = self._stop_prefix_len(held)
        delta, self._held = held[: len(held) - keep], held[len(held) - keep:]
        self.text += delta
        return delta, False

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for k in range(min(len(text), self._max_stop - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0
