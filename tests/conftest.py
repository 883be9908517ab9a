"""Shared fixtures: tiny random checkpoints and adapters, built once per session."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from loragate.testing import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tokenizer_dir):
    """shape name -> checkpoint dir, built lazily on first use."""
    from loragate.testing import build_checkpoint

    cache: dict[str, object] = {}

    def get(shape: str, **kw):
        key = shape + repr(sorted(kw.items()))
        if key not in cache:
            cache[key] = build_checkpoint(tmp_path_factory.mktemp(shape), shape, tokenizer_dir=tokenizer_dir, **kw)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def base(checkpoints):
    """The default test checkpoint (Llama 3 shape, float32); a module that needs another shape
    defines its own `base`."""
    return checkpoints("llama3")


@pytest.fixture(scope="module")
def hf_model(base):
    """transformers' model of `base` in float32, the reference the engine's outputs are held to."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()


@pytest.fixture(params=["native", "avx2", "portable"])
def isa_target(request, monkeypatch):
    """Runs a native-kernel test once per build path this host can execute: the default native
    build (-march=native: AVX-512 where the CPU has it), the AVX2 path and the portable one."""
    from loragate.engine import host
    from loragate.kernels import native

    target = request.param
    if native.compiler() is None:
        pytest.skip("no C++ compiler on this host")
    if target == "avx2" and not host.detect().features.avx2:
        pytest.skip("this CPU cannot run the AVX2 path")
    monkeypatch.setenv(native.ISA_ENV, target)
    return target


# ---- secrets never reach logs or error messages, checked over the whole suite ------------------
# Every log record (any logger) and every OpenAI-style error body the gateway renders is scanned for
# API keys (tests use keys of the form sk-...) and for adapter paths: any path under pytest's
# temporary directory that is, or lies in, or holds an adapter folder (one with adapter_config.json).
# A leak fails the session at its end, naming the offending text.
import logging  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

_KEY_RE = re.compile(r"\bsk-[A-Za-z0-9_-]{2,}")
_leaks: list[str] = []
_watch: dict = {}


def _is_adapter_path(text: str) -> bool:
    p = Path(text)
    for candidate in (p, *p.parents):
        if (candidate / "adapter_config.json").exists():
            return True
        if candidate == Path(_watch["base"]):
            break
    try:
        return p.is_dir() and any((c / "adapter_config.json").exists() for c in p.iterdir() if c.is_dir())
    except OSError:
        return False


def _scan(where: str, text: str) -> None:
    base = _watch.get("base")
    paths = re.findall(re.escape(base) + r"[^\s'\"),]*", text) if base else []
    if _KEY_RE.search(text) or any(_is_adapter_path(p) for p in paths):
        _leaks.append(f"{where}: {text[:500]}")


class _LeakWatch(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            _scan(f"log {record.name}", self.format(record))
        except Exception:  # noqa: BLE001 - a broken record must not break the suite
            pass


@pytest.fixture(scope="session", autouse=True)
def _secrets_watch(tmp_path_factory):
    try:
        from loragate.gateway import errors
    except ImportError:  # an engine-only environment (the GPU check has no FastAPI): watch logs only
        errors = None

    _watch["base"] = str(tmp_path_factory.getbasetemp())
    handler = _LeakWatch(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root, ours = logging.getLogger(), logging.getLogger("loragate")
    old_level = ours.level
    ours.setLevel(logging.DEBUG)  # so that every line the server could log is seen
    root.addHandler(handler)
    real_body = errors.error_body if errors else None

    def watched_body(message, type, param=None, code=None):
        _scan(f"error body ({code})", str(message))
        return real_body(message, type, param, code)

    if errors:
        errors.error_body = watched_body
    yield
    if errors:
        errors.error_body = real_body
    root.removeHandler(handler)
    ours.setLevel(old_level)


def pytest_sessionfinish(session, exitstatus):
    if _leaks:
        print("\nSECRETS LEAKED into logs or error messages:\n  " + "\n  ".join(_leaks[:20]))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
