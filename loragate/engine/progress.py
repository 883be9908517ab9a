"""Progress of slow start-up work (reading a large checkpoint, loading pinned adapters).

The engine only reports `(task, done, total)`; whoever started it decides whether and how to show
that (the CLI draws a bar on a terminal and logs plain lines otherwise, see `loragate/startup.py`).
With no listener a report costs one list lookup, so loaders may call it per tensor.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

Listener = Callable[[str, int, int], None]

_lock = threading.Lock()
_listeners: list[Listener] = []


def add_listener(fn: Listener) -> Callable[[], None]:
    """Call fn(task, done, total) on every report; returns a function that removes it again."""
    with _lock:
        _listeners.append(fn)

    def remove() -> None:
        with _lock:
            if fn in _listeners:
                _listeners.remove(fn)

    return remove


def report(task: str, done: int, total: int) -> None:
    """`done` of `total` units (bytes, adapters) of `task` are finished. Listener errors are
    swallowed: showing progress must never break loading."""
    if not _listeners:
        return
    with _lock:
        listeners = list(_listeners)
    for fn in listeners:
        try:
            fn(task, done, total)
        except Exception:  # noqa: BLE001 - a display problem is not a load problem
            pass
