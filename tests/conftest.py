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
