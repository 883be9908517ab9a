"""Per-key limits from the keys file: `max_concurrent` requests in flight and `tokens_per_minute`
(prompt + completion tokens), each answered with 429 and a Retry-After header when exceeded.

Tokens are metered with a token bucket per key: it holds up to `tokens_per_minute` tokens and
refills at `tokens_per_minute / 60` per second. A request is admitted while the bucket is above
zero; its prompt tokens are taken at admission and its completion tokens when it ends, so the
bucket may go below zero by one request's worth and the key then waits until it has refilled
(Retry-After says how long). State is kept per key id (never the key itself), so it is bounded by
the number of keys in the file.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from loragate.gateway.auth import Principal
from loragate.gateway.errors import APIError


@dataclass
class _KeyState:
    running: int = 0
    level: float = 0.0
    updated: float = 0.0


def _limited(message: str, retry_after: int) -> APIError:
    return APIError(429, message, "rate_limit_error", None, "rate_limit_exceeded",
                    {"Retry-After": str(max(1, retry_after))})


class KeyQuotas:
    """Concurrency and token-rate accounting for keys that carry limits."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._keys: dict[str, _KeyState] = {}

    def _state(self, p: Principal) -> _KeyState:
        st = self._keys.get(p.key_id)
        if st is None:
            st = self._keys[p.key_id] = _KeyState(level=float(p.tokens_per_minute or 0), updated=self._clock())
        if p.tokens_per_minute:
            now = self._clock()
            rate = p.tokens_per_minute / 60.0
            st.level = min(float(p.tokens_per_minute), st.level + (now - st.updated) * rate)
            st.updated = now
        return st

    @staticmethod
    def limited(p: Principal | None) -> bool:
        return p is not None and bool(p.max_concurrent or p.tokens_per_minute)

    def admit(self, p: Principal | None, prompt_tokens: int, retry_after: int = 1) -> bool:
        """Take a concurrency slot and the prompt's tokens, or raise 429. True if anything was taken
        (the caller then owes one `release`)."""
        if not self.limited(p):
            return False
        st = self._state(p)
        if p.max_concurrent and st.running >= p.max_concurrent:
            raise _limited(f"this API key already has {st.running} requests in flight, its limit "
                           f"(max_concurrent={p.max_concurrent}); retry when one finishes", retry_after)
        if p.tokens_per_minute and st.level <= 0:
            wait = math.ceil((1 - st.level) / (p.tokens_per_minute / 60.0))
            raise _limited(f"this API key used its {p.tokens_per_minute} tokens per minute; retry in "
                           f"{wait} s", wait)
        st.running += 1
        if p.tokens_per_minute:
            st.level -= prompt_tokens
        return True

    def release(self, p: Principal, completion_tokens: int) -> None:
        st = self._state(p)
        st.running = max(0, st.running - 1)
        if p.tokens_per_minute:
            st.level -= completion_tokens
