"""Build and load the package's small native CPU kernels (loragate/kernels/csrc/*.cpp).

Why at run time rather than at install: the kernels are compiled for the host's own CPU
(`-march=native`: AVX-512 where the host has it), and `pip install` of a pure-Python package
keeps working where no compiler is present. A kernel is a plain C function loaded with ctypes:
no torch headers, so a build takes about two seconds, once per host, cached under
`$LORAGATE_CACHE_DIR` (default `~/.cache/loragate`) by a hash of the source, the compiler, its
flags and the CPU. When anything fails (no compiler, a compile error, an unloadable library) the
caller gets None and the engine keeps the torch path; the reason is logged once.

`LORAGATE_CXX` names the compiler (default `$CXX`, else `c++`, `g++`).
`LORAGATE_CPU_KERNELS=native|torch` forces a backend for every op that has a native kernel (read on
every call, so tests and benchmarks can switch it); by default CPU tensors take the native kernel
when it built.
"""
from __future__ import annotations

import ctypes
import getpass
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch  # loaded before any kernel library, so that its libgomp is the one they join

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
CACHE_ENV = "LORAGATE_CACHE_DIR"
CXX_ENV = "LORAGATE_CXX"
BACKEND_ENV = "LORAGATE_CPU_KERNELS"
BACKENDS = ("native", "torch")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # as loragate::with_storage
# OpenMP: the library joins the libgomp that torch has already loaded (same soname), so its
# parallel regions run on torch's thread pool instead of a second pool competing for the cores.
CXXFLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")


@dataclass(frozen=True)
class NativeBuild:
    """Outcome of one build attempt: the loaded library, or why there is none."""

    library: ctypes.CDLL | None
    path: Path | None
    error: str | None


_builds: dict[str, NativeBuild] = {}
_lock = threading.Lock()
_name_locks: dict[str, threading.Lock] = {}
_functions: dict[tuple[str, str], ctypes._CFuncPtr] = {}
_disabled: set[str] = set()


def compiler() -> str | None:
    """Path of the C++ compiler to use, or None when there is none on this host."""
    for name in (os.environ.get(CXX_ENV), os.environ.get("CXX"), "c++", "g++"):
        if name and (found := shutil.which(name)):
            return found
    return None


def cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "loragate")
    return Path(base) / "kernels"


def _cpu_signature() -> str:
    """What -march=native depends on: a library built on one CPU must not load on another."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dirs() -> list[Path]:
    """Where a built library may live: the cache dir, then (unless one was named explicitly) a
    per-user temporary dir, for hosts whose home is read-only."""
    dirs = [cache_dir()]
    if not os.environ.get(CACHE_ENV):
        dirs.append(Path(tempfile.gettempdir()) / f"loragate-{getpass.getuser()}" / "kernels")
    return dirs


def _compile(cxx: str, source: Path, target: Path) -> tuple[str | None, bool]:
    """Build `target`; returns (error or None, whether another directory might work)."""
    logger.info("compiling the native CPU kernel %s for this CPU (once; cached in %s)", source.stem, target.parent)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # build beside the target, then rename: processes that build at once never load a half-written file
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
    except OSError as e:
        return f"cannot write to {target.parent}: {e}", True
    try:
        proc = subprocess.run([cxx, *CXXFLAGS, "-o", tmp, str(source)], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            return f"compiling {source.name} failed: {proc.stderr.strip()[-2000:]}", False
        os.replace(tmp, target)
        return None, False
    except (OSError, subprocess.SubprocessError) as e:
        return f"compiling {source.name} failed: {e}", False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build(name: str) -> NativeBuild:
    source = CSRC / f"{name}.cpp"
    cxx = compiler()
    if cxx is None:
        return NativeBuild(None, None, f"no C++ compiler found (set {CXX_ENV})")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return NativeBuild(None, None, f"{cxx} --version failed: {e}")
    key = hashlib.sha256()
    headers = b"".join(p.read_bytes() for p in sorted(CSRC.glob("*.h")))
    for part in (source.read_bytes(), headers, cxx.encode(), version.encode(), " ".join(CXXFLAGS).encode(),
                 _cpu_signature().encode()):
        key.update(part)
        key.update(b"\0")
    error = None
    for directory in _cache_dirs():
        target = directory / f"{name}-{key.hexdigest()[:16]}.so"
        if not target.exists():
            error, elsewhere = _compile(cxx, source, target)
            if error is not None:
                if elsewhere:
                    continue
                return NativeBuild(None, None, error)
        try:
            return NativeBuild(ctypes.CDLL(str(target)), target, None)
        except OSError as e:
            return NativeBuild(None, target, f"loading {target} failed: {e}")
    return NativeBuild(None, None, error)


def load(name: str) -> NativeBuild:
    """The built library `csrc/<name>.cpp` (built on the first call in a process, then cached)."""
    with _lock:
        name_lock = _name_locks.setdefault(name, threading.Lock())
    with name_lock:  # one build per library at a time; different libraries build side by side
        build = _builds.get(name)
        if build is None:
            build = _builds[name] = _build(name)
            if build.error:
                logger.warning("native kernel %s unavailable, using the torch path: %s", name, build.error)
        return build


def load_all() -> dict[str, NativeBuild]:
    """Every kernel library of csrc/, built in parallel (the engine calls this at start-up, so no
    step waits on a compiler)."""
    names = [p.stem for p in sorted(CSRC.glob("*.cpp"))]
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        return dict(zip(names, pool.map(load, names)))


def forget(name: str) -> None:
    """Drop the memo of `name` so the next `load` tries again (tests change the compiler)."""
    with _lock:
        name_lock = _name_locks.setdefault(name, threading.Lock())
    with name_lock:
        _builds.pop(name, None)
        for key in [k for k in _functions if k[0] == name]:
            del _functions[key]


def disable(name: str, reason: str) -> None:
    """Treat library `name` as unavailable (every op takes its torch path) until `enable`: the
    engine's start-up self-check found it wrong, or the server runs with `--lora-kernels torch`."""
    forget(name)
    with _lock:
        _builds[name] = NativeBuild(None, None, f"disabled: {reason}")
        _disabled.add(name)


def enable(name: str) -> None:
    """Undo `disable` (the next `load` finds the built library again)."""
    with _lock:
        was = name in _disabled
        _disabled.discard(name)
    if was:
        forget(name)


def use_native(tensor: torch.Tensor, name: str) -> bool:
    """Whether an op on `tensor` runs library `name`: the forced backend if set, else CPU tensors
    of a supported dtype when the library built."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {forced!r}")
        if forced == "torch":
            return False
        if load(name).library is None:
            raise RuntimeError(f"{BACKEND_ENV}=native but the native kernel {name} is unavailable: {load(name).error}")
    return tensor.device.type == "cpu" and tensor.dtype in DTYPE_CODES and load(name).library is not None


def function(name: str, symbol: str, argtypes: list) -> ctypes._CFuncPtr:
    """`symbol` of library `name` with its C signature set (int return); the library must have
    built. Memoised: the wrappers call this on every kernel call, where it is one dict lookup."""
    fn = _functions.get((name, symbol))
    if fn is None:
        lib = load(name).library
        if lib is None:
            raise RuntimeError(f"the native kernel {name} is unavailable: {load(name).error}")
        fn = getattr(lib, symbol)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
        _functions[(name, symbol)] = fn
    return fn


def check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"native {what} failed (code {rc}: {'unknown dtype' if rc == -1 else 'index out of range'})")
