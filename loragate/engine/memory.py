"""How much memory is left on a device: what the start-up budgets (adapter slots, KV cache) are
fractions of. CUDA asks the driver; the CPU reads the kernel's estimate of memory available
without swapping, bounded by the container's cgroup limit when there is one (inside a container
/proc/meminfo shows the whole host)."""
from __future__ import annotations

import os
from pathlib import Path

import torch


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for name, share in (("SC_AVPHYS_PAGES", 1.0), ("SC_PHYS_PAGES", 0.5)):  # the latter: half of RAM
        try:
            return int(os.sysconf(name) * os.sysconf("SC_PAGE_SIZE") * share)
        except (ValueError, OSError, AttributeError):
            continue
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) is not a number


def _cgroup_headroom() -> int | None:
    """limit - usage of this process's memory cgroup (v2, else v1), or None without a limit."""
    for limit, usage in (("memory.max", "memory.current"),
                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        lim, used = _read_int(Path("/sys/fs/cgroup") / limit), _read_int(Path("/sys/fs/cgroup") / usage)
        if lim is not None and used is not None and lim < (1 << 60):  # v1 reports "no limit" as ~2^63
            return max(0, lim - used)
    return None


def available_bytes(device: torch.device) -> int:
    """Bytes that can still be allocated on `device` (0 when unknown on the CPU)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    found = [v for v in (_meminfo_available(), _cgroup_headroom()) if v is not None]
    return min(found) if found else 0
