"""Bounds on untrusted JSON, checked before `json.loads` does real work.

Both adapter configs (files customers upload) and request bodies (what clients send) are JSON
from strangers. Python's decoder recurses once per nesting level, so a document of a million `[`
ends in RecursionError after burning the stack, and a huge array costs time and memory in every
layer that walks it. `nesting_depth` finds the deepest nesting of raw JSON text without parsing
it: strings are cut out with one regex (brackets inside strings do not count), the remaining
brackets become +1/-1 steps, and the running sum's maximum is the depth (numpy, so a body of
megabytes costs milliseconds). `largest_array` walks an already-parsed value iteratively.
"""
from __future__ import annotations

import re

import numpy as np

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")


def nesting_depth(raw: bytes | str) -> int:
    """Deepest bracket nesting in JSON text (0 for a scalar). Malformed text gets some number;
    the decoder rejects it afterwards anyway."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    brackets = _NOT_BRACKET.sub(b"", _STRING.sub(b"", data))
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1).astype(np.int32)
    return int(np.cumsum(steps).max())


def largest_array(value: object) -> int:
    """The length of the longest list (or object) anywhere in a parsed JSON value."""
    longest, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            longest = max(longest, len(v))
            stack.extend(x for x in v if isinstance(x, (list, dict)))
        elif isinstance(v, dict):
            longest = max(longest, len(v))
            stack.extend(x for x in v.values() if isinstance(x, (list, dict)))
    return longest
