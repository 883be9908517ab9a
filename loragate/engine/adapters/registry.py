"""Adapter name -> directory. The only place a client-supplied name turns into a filesystem path.

Names come straight from the `model` field of an HTTP request, so they are treated as hostile:
a conservative pattern (no separators, no '..', no leading dot, no ':' which `BASE:ADAPTER` uses),
and a name looked up in `adapter_dir` must resolve, after symlinks, to a directory inside it.
Lookups in `adapter_dir` happen on every call, so an adapter copied there after start-up is served
on first use without a restart.
"""
from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from loragate.engine.errors import AdapterNotFoundError

CONFIG_NAME = "adapter_config.json"
MAX_VIRTUAL = 4096  # remote and merged adapters remembered at once (least recently used forgotten)
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


def is_valid_name(name: object) -> bool:
    """True for names that are safe as a single path component and unambiguous in `BASE:ADAPTER`."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        return False
    return ".." not in name and "\x00" not in name and not os.path.isabs(name)


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(path))


class AdapterRegistry:
    """Explicit name -> path mappings (CLI and admin API) plus on-demand discovery in `adapter_dir`."""

    def __init__(self, adapters: Iterable[tuple[str, str]] = (), adapter_dir: str | None = None,
                 allowed_dirs: Iterable[str] = ()) -> None:
        self.adapter_dir = adapter_dir
        self.allowed_dirs = tuple(allowed_dirs)
        self._lock = threading.RLock()
        self._explicit: dict[str, str] = {}
        self._hidden: set[str] = set()  # adapter_dir entries unregistered through the admin API
        # remote and merged adapters (engine/adapters/virtual.py), by their deterministic names
        self._virtual: OrderedDict[str, Any] = OrderedDict()
        for name, path in adapters:
            if not is_valid_name(name):
                raise ValueError(f"invalid adapter name {name!r}")
            self._explicit[name] = str(path)

    is_valid_name = staticmethod(is_valid_name)

    def _from_dir(self, name: str) -> str | None:
        """adapter_dir/<name> if it is a directory inside adapter_dir holding an adapter config."""
        if self.adapter_dir is None:
            return None
        root = _real(self.adapter_dir)
        real = _real(os.path.join(self.adapter_dir, name))
        if real == root or not real.is_relative_to(root):
            return None  # a symlink pointing out of adapter_dir
        if not real.is_dir() or not (real / CONFIG_NAME).is_file():
            return None
        return str(real)

    def resolve(self, name: str) -> str | None:
        """The adapter's directory, or None. Explicit names win over adapter_dir."""
        if not is_valid_name(name):
            return None
        with self._lock:
            if name in self._explicit:
                return self._explicit[name]
            if name in self._hidden:
                return None
        return self._from_dir(name)

    def add_virtual(self, spec: Any) -> str:
        """Remember a remote or merged adapter under `spec.name` (idempotent; marks it recently
        used). Its names cannot collide with local ones: they contain ':' which those never do."""
        name = spec.name
        with self._lock:
            self._virtual[name] = spec
            self._virtual.move_to_end(name)
            while len(self._virtual) > MAX_VIRTUAL:
                self._virtual.popitem(last=False)
        return name

    def virtual(self, name: str) -> Any | None:
        with self._lock:
            return self._virtual.get(name)

    def exists(self, name: str) -> bool:
        """A local adapter that resolves, or a registered remote/merged one."""
        return self.virtual(name) is not None or self.resolve(name) is not None

    def names(self) -> list[str]:
        """Explicit names, then those currently present in adapter_dir (sorted)."""
        with self._lock:
            out = list(self._explicit)
            hidden = set(self._hidden)
        if self.adapter_dir is not None and os.path.isdir(self.adapter_dir):
            try:
                entries = sorted(os.listdir(self.adapter_dir))
            except OSError:
                entries = []
            seen = set(out)
            for entry in entries:
                if entry in seen or entry in hidden or not is_valid_name(entry):
                    continue
                if self._from_dir(entry) is not None:
                    out.append(entry)
        return out

    def _inside_allowed(self, path: str) -> Path | None:
        real = _real(path)
        roots = ([self.adapter_dir] if self.adapter_dir else []) + list(self.allowed_dirs)
        for d in roots:
            root = _real(d)
            if real != root and real.is_relative_to(root):
                return real
        return None

    def register(self, name: str, path: str) -> None:
        """Admin API: serve `path` under `name`. The path must lie inside adapter_dir or an allowed
        dir after resolving symlinks, so an API key cannot point the server at arbitrary files."""
        if not is_valid_name(name):
            raise ValueError(f"invalid adapter name {name!r}: use letters, digits, '.', '_', '-' "
                             "(no leading '.', no '..', no ':')")
        real = self._inside_allowed(path)
        if real is None:
            raise ValueError("adapter path is outside the allowed adapter directories")
        if not real.is_dir():
            raise ValueError("no adapter directory at the given path")
        with self._lock:
            if self.resolve(name) is not None:
                raise ValueError(f"adapter {name!r} already exists")
            self._explicit[name] = str(real)
            self._hidden.discard(name)

    def unregister(self, name: str) -> None:
        """Forget `name`. An adapter_dir entry is hidden (its files are left alone) until registered."""
        with self._lock:
            known = name in self._explicit or (name not in self._hidden and self._from_dir(name) is not None)
            if known:
                self._explicit.pop(name, None)
                if self._from_dir(name) is not None:
                    self._hidden.add(name)  # else the dir entry of the same name would resurface
                return
        raise AdapterNotFoundError(f"adapter {name!r} not found")
