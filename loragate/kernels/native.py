"""Build and load the package's small native CPU kernels (loragate/kernels/csrc/*.cpp).

Why at run time rather than at install: the kernels are compiled for the host's own CPU
(`-march=native`: the AVX-512 path where the host has it, the AVX2 path where it has AVX2, a
portable one elsewhere; see csrc/isa.h), and `pip install` of a pure-Python package keeps working
where no compiler is present. A kernel is a plain C function loaded with ctypes:
no torch headers, so a build takes about two seconds, once per host, cached under
`$LORAGATE_CACHE_DIR` (default `~/.cache/loragate`) by a hash of the source, the compiler, its
flags and the CPU. When anything fails (no compiler, a compile error, an unloadable library) the
caller gets None and the engine keeps the torch path; the reason is logged once.

`LORAGATE_CXX` names the compiler (default `$CXX`, else `c++`, `g++`).
`LORAGATE_CPU_ISA=native|avx512|avx2|portable` picks the build target (default native: what the
compiler finds on this CPU; the others force that path, so tests run every path a host can, and a
host whose compiler mis-detects can be told). Read on every call too; each target is a library of
its own. A library built for instructions this CPU lacks is refused after loading (it answers
`loragate_cpu_supported`) rather than run into an illegal instruction; a `native` build the
compiler refuses (an `-march=native` it does not know) falls back to the portable flags.
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
ISA_ENV = "LORAGATE_CPU_ISA"
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # as loragate::with_storage
# OpenMP: the library joins the libgomp that torch has already loaded (same soname), so its
# parallel regions run on torch's thread pool instead of a second pool competing for the cores.
# -fno-trapping-math lets the compiler if-convert the clamps before float-to-int conversions (exp,
# SiLU), without which those loops stay scalar on AVX2 and SSE (AVX-512 masks them anyway); like
# -fno-math-errno it changes no result (torch builds with both).
CXXFLAGS = ("-O3", "-fno-trapping-math", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
# build targets: the path csrc/isa.h compiles follows the instruction sets these enable
TARGET_FLAGS: dict[str, tuple[str, ...]] = {
    "native": ("-march=native",),
    "avx512": ("-march=skylake-avx512", "-mtune=generic"),  # AVX-512 F/CD/BW/DQ/VL
    "avx2": ("-march=haswell", "-mtune=generic"),  # AVX2, FMA, F16C (x86-64-v3)
    "portable": (),  # the compiler's baseline for the architecture
}


@dataclass(frozen=True)
class NativeBuild:
    """Outcome of one build attempt: the loaded library, or why there is none."""

    library: ctypes.CDLL | None
    path: Path | None
    error: str | None
    target: str = "native"  # the LORAGATE_CPU_ISA target asked for
    isa: str | None = None  # the path the library compiled to: avx512, avx2 or portable


_builds: dict[tuple[str, str], NativeBuild] = {}
_lock = threading.Lock()
_name_locks: dict[str, threading.Lock] = {}
_functions: dict[tuple[str, str, str], ctypes._CFuncPtr] = {}
_disabled: dict[str, str] = {}  # library -> why it is switched off (every target)


def target() -> str:
    """The build target `LORAGATE_CPU_ISA` names (default native)."""
    forced = os.environ.get(ISA_ENV, "").strip().lower()
    if not forced:
        return "native"
    if forced not in TARGET_FLAGS:
        raise ValueError(f"{ISA_ENV} must be one of {tuple(TARGET_FLAGS)}, got {forced!r}")
    return forced


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


def _compile(cxx: str, flags: tuple[str, ...], source: Path, target: Path) -> tuple[str | None, bool]:
    """Build `target`; returns (error or None, whether another directory might work)."""
    logger.info("compiling the native CPU kernel %s for this CPU (%s; once, cached in %s)", source.stem,
                " ".join(flags), target.parent)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # build beside the target, then rename: processes that build at once never load a half-written file
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
    except OSError as e:
        return f"cannot write to {target.parent}: {e}", True
    try:
        proc = subprocess.run([cxx, *flags, "-o", tmp, str(source)], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            return f"compiling {source.name} failed: {proc.stderr.strip()[-2000:]}", False
        os.replace(tmp, target)
        return None, False
    except (OSError, subprocess.SubprocessError) as e:
        return f"compiling {source.name} failed: {e}", False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _open(path: Path, name: str, isa_target: str) -> NativeBuild:
    """Load a built library and check that this CPU can run the path it was compiled for."""
    try:
        lib = ctypes.CDLL(str(path))
        lib.loragate_isa.restype = ctypes.c_char_p
        lib.loragate_isa.argtypes = []
        lib.loragate_cpu_supported.restype = ctypes.c_int
        lib.loragate_cpu_supported.argtypes = []
        isa = lib.loragate_isa().decode()
        supported = lib.loragate_cpu_supported()
    except (OSError, AttributeError) as e:
        return NativeBuild(None, path, f"loading {path} failed: {e}", isa_target)
    if not supported:
        return NativeBuild(None, path, f"{name} was built for {isa} ({ISA_ENV}={isa_target}), which this CPU "
                           "cannot run", isa_target, isa)
    return NativeBuild(lib, path, None, isa_target, isa)


def _build_with(name: str, cxx: str, version: str, flags: tuple[str, ...], isa_target: str) -> NativeBuild:
    source = CSRC / f"{name}.cpp"
    key = hashlib.sha256()
    headers = b"".join(p.read_bytes() for p in sorted(CSRC.glob("*.h")))
    for part in (source.read_bytes(), headers, cxx.encode(), version.encode(), " ".join(flags).encode(),
                 _cpu_signature().encode()):
        key.update(part)
        key.update(b"\0")
    error = None
    for directory in _cache_dirs():
        path = directory / f"{name}-{key.hexdigest()[:16]}.so"
        if not path.exists():
            error, elsewhere = _compile(cxx, flags, source, path)
            if error is not None:
                if elsewhere:
                    continue
                return NativeBuild(None, None, error, isa_target)
        return _open(path, name, isa_target)
    return NativeBuild(None, None, error, isa_target)


def _build(name: str, isa_target: str) -> NativeBuild:
    cxx = compiler()
    if cxx is None:
        return NativeBuild(None, None, f"no C++ compiler found (set {CXX_ENV})", isa_target)
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return NativeBuild(None, None, f"{cxx} --version failed: {e}", isa_target)
    build = _build_with(name, cxx, version, CXXFLAGS + TARGET_FLAGS[isa_target], isa_target)
    if build.library is None and isa_target == "native" and build.path is None:
        # a compiler without -march=native for this CPU (or architecture): the portable path
        fallback = _build_with(name, cxx, version, CXXFLAGS + TARGET_FLAGS["portable"], isa_target)
        if fallback.library is not None:
            logger.warning("native kernel %s: the -march=native build failed, using the portable build (%s)",
                           name, build.error)
            return fallback
    return build


def load(name: str, isa_target: str | None = None) -> NativeBuild:
    """The built library `csrc/<name>.cpp` for `isa_target` (default: `target()`), built on the
    first call in a process, then cached."""
    isa_target = isa_target or target()
    with _lock:
        name_lock = _name_locks.setdefault(name, threading.Lock())
    with name_lock:  # one build per library at a time; different libraries build side by side
        if name in _disabled:
            return NativeBuild(None, None, f"disabled: {_disabled[name]}", isa_target)
        build = _builds.get((name, isa_target))
        if build is None:
            build = _builds[(name, isa_target)] = _build(name, isa_target)
            if build.error:
                logger.warning("native kernel %s unavailable, using the torch path: %s", name, build.error)
        return build


def load_all(isa_target: str | None = None) -> dict[str, NativeBuild]:
    """Every kernel library of csrc/, built in parallel (the engine calls this at start-up, so no
    step waits on a compiler)."""
    isa_target = isa_target or target()
    names = [p.stem for p in sorted(CSRC.glob("*.cpp"))]
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        return dict(zip(names, pool.map(lambda n: load(n, isa_target), names)))


def forget(name: str) -> None:
    """Drop the memo of `name` (every target) so the next `load` tries again (tests change the
    compiler)."""
    with _lock:
        name_lock = _name_locks.setdefault(name, threading.Lock())
    with name_lock:
        for key in [k for k in _builds if k[0] == name]:
            del _builds[key]
        for key in [k for k in _functions if k[0] == name]:
            del _functions[key]


def disable(name: str, reason: str) -> None:
    """Treat library `name` as unavailable (every op takes its torch path) until `enable`: the
    engine's start-up self-check found it wrong, or the server runs with `--lora-kernels torch`."""
    forget(name)
    with _lock:
        _disabled[name] = reason


def enable(name: str) -> None:
    """Undo `disable` (the next `load` finds the built library again)."""
    with _lock:
        was = _disabled.pop(name, None) is not None
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
    """`symbol` of library `name` (for the current `target()`) with its C signature set (int
    return); the library must have built. Memoised: the wrappers call this on every kernel call,
    where it is one environment read and one dict lookup."""
    isa_target = os.environ.get(ISA_ENV) or "native"
    fn = _functions.get((name, isa_target, symbol))
    if fn is None:
        build = load(name)  # validates the target's name
        if build.library is None:
            raise RuntimeError(f"the native kernel {name} is unavailable: {build.error}")
        fn = getattr(build.library, symbol)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
        _functions[(name, isa_target, symbol)] = fn
    return fn


def check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"native {what} failed (code {rc}: {'unknown dtype' if rc == -1 else 'index out of range'})")
