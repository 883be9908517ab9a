"""Parametrisation shared by tests that run on both CPU backends: the native kernels need a C++
compiler (CI has one; where there is none they are skipped, and the torch path still runs).

The `isa_target` fixture (conftest.py) runs a native-kernel test once per build path the host can
execute: the default native build (-march=native: AVX-512 where the CPU has it), the AVX2 path and
the portable one, each a library of its own (LORAGATE_CPU_ISA, read on every kernel call)."""
import pytest

from loragate.kernels import native

needs_compiler = pytest.mark.skipif(native.compiler() is None, reason="no C++ compiler on this host")
CPU_KERNEL_BACKENDS = [pytest.param("native", marks=needs_compiler), "torch"]
