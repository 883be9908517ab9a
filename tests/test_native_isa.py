"""The native kernels' build targets (LORAGATE_CPU_ISA): each compiles the vector path it names,
a library for instructions this CPU lacks is refused before it runs, and a compiler that refuses
-march=native still gets the portable build. (Each kernel's results on each path are tested beside
its torch reference, through the `isa_target` fixture.)"""
from __future__ import annotations

import pytest
from native_marks import needs_compiler

from loragate.engine import host
from loragate.kernels import native


def test_each_target_compiles_the_path_it_names(isa_target):
    expected = host.detect().features.kernel_isa if isa_target == "native" else isa_target
    for name, build in native.load_all().items():
        assert build.library is not None, build.error
        assert (build.target, build.isa) == (isa_target, expected), name
    assert host.kernel_isa() == f"{expected} ({isa_target} build)"


def test_an_unknown_target_is_refused(monkeypatch):
    monkeypatch.setenv(native.ISA_ENV, "avx9000")
    with pytest.raises(ValueError, match=native.ISA_ENV):
        native.target()


@needs_compiler
def test_a_library_this_cpu_cannot_run_is_refused(monkeypatch, tmp_path):
    """What a library built for a bigger CPU answers (loragate_cpu_supported() == 0) keeps it
    unloaded: the torch path serves, with the reason."""
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "probe.cpp").write_text('extern "C" { const char* loragate_isa() { return "avx512"; }\n'
                                    'int loragate_cpu_supported() { return 0; } }\n')
    monkeypatch.setattr(native, "CSRC", csrc)
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    native.forget("probe")
    try:
        build = native.load("probe", "portable")
        assert build.library is None and build.isa == "avx512"
        assert "this CPU cannot run" in build.error
    finally:
        native.forget("probe")


@needs_compiler
def test_a_refused_march_native_falls_back_to_the_portable_build(monkeypatch, tmp_path):
    real = native.compiler()
    fake = tmp_path / "bin" / "old-cxx"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -march=native ] && '
                    f'{{ echo "error: unknown -march=native" >&2; exit 1; }}; done\nexec {real} "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv(native.CXX_ENV, str(fake))
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(native.ISA_ENV, raising=False)
    native.forget("elementwise")
    try:
        build = native.load("elementwise")
        assert build.library is not None, build.error
        assert (build.target, build.isa) == ("native", "portable")
    finally:
        native.forget("elementwise")
