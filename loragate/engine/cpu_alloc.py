"""Keep glibc from handing large blocks back to the OS between decode steps.

PyTorch's CPU allocator is plain malloc. glibc serves blocks above its mmap threshold (128 KiB by
default, adaptive up to 32 MiB) with fresh mmap calls and unmaps them on free, so every step's
activations and gathered KV blocks page-fault anew: at batch 64 that made decode attention ~5x
slower than the arithmetic. Raising the mmap and trim thresholds keeps freed memory in the heap
for reuse, which is what jemalloc/tcmalloc deployments get by default.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger("loragate.engine")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def tune_malloc(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Apply once per process on Linux/glibc; returns whether the settings took effect."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        ok = False
    _done = ok
    if not ok:
        log.debug("mallopt not available; leaving the allocator as it is")
    return ok
