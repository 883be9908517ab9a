"""Parametrisation shared by tests that run on both CPU backends: the native kernels need a C++
compiler (CI has one; where there is none they are skipped, and the torch path still runs)."""
import pytest

from loragate.kernels import native

needs_compiler = pytest.mark.skipif(native.compiler() is None, reason="no C++ compiler on this host")
CPU_KERNEL_BACKENDS = [pytest.param("native", marks=needs_compiler), "torch"]
