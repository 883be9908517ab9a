"""The start-up kernel self-check (loragate.engine.kernel_check): the Triton path through Triton's
interpreter on the CPU with TRITON_INTERPRET=1 set (the check must not be fooled by it), the native
CPU kernels, the failure messages (a missing C compiler simulated by an empty PATH, wrong results by
a broken kernel), `--lora-kernels torch`, and the engine and CLI refusing to start."""
from __future__ import annotations

import logging

import pytest
import torch

from loragate import cli
from loragate.engine import kernel_check
from loragate.engine.kernel_check import KernelCheckError, check_kernels, check_triton, rank_buckets
from loragate.kernels import chunk_attention, elementwise, native
from loragate.kernels import lora as lora_dispatch

from engine_utils import make_engine, request, run_to_completion, tokens
from native_marks import needs_compiler

try:
    from loragate.kernels import lora_triton
except ImportError:  # pragma: no cover - only where triton is missing
    lora_triton = None

needs_triton = pytest.mark.skipif(lora_triton is None, reason="triton not importable")
CPU = torch.device("cpu")
NO_COMPILER_MESSAGE = "Failed to find C compiler. Please specify via CC environment variable or set triton.knobs.build.impl."


@pytest.fixture(autouse=True)
def restore_kernels():
    """Each check switches the process's kernels; leave them all on for the next test."""
    yield
    kernel_check._enable_all()


@pytest.fixture
def no_compilers(monkeypatch, tmp_path):
    """A host without any C or C++ compiler: PATH holds nothing, no CC/CXX/LORAGATE_CXX."""
    for var in ("CC", "CXX", native.CXX_ENV):
        monkeypatch.delenv(var, raising=False)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    for lib in kernel_check.NATIVE_LIBRARIES:
        native.forget(lib)
    yield
    for lib in kernel_check.NATIVE_LIBRARIES:
        native.forget(lib)  # rebuilt (from the cache) with the real PATH by the next user


# ---- the Triton path, interpreted -----------------------------------------------------------------


@needs_triton
def test_triton_probes_pass_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    report = check_kernels(CPU, torch.float32, "auto", backend="triton")
    assert [r.name for r in report.results] == ["triton lora_shrink", "triton lora_expand", "triton add_lora"]
    assert all(r.ok for r in report.results) and not report.fallback
    assert lora_dispatch.triton_available()
    assert "3/3 kernels match their torch reference" in report.summary()


@needs_triton
def test_wrong_triton_results_refuse_to_start(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    real = lora_triton.add_lora_triton

    def off_by_a_slot(y, x, A, B, offsets, layout):  # reads every adapter from the next slot
        real(y, x, A.roll(1, dims=0), B.roll(1, dims=0), offsets, layout)

    monkeypatch.setattr(lora_triton, "add_lora_triton", off_by_a_slot)
    with pytest.raises(KernelCheckError) as err:
        check_kernels(CPU, torch.float32, "auto", backend="triton")
    msg = str(err.value)
    assert "Triton LoRA kernels failed their start-up self-check" in msg
    assert "cause: triton add_lora (float32) differs from its torch reference: max |error|" in msg
    assert "fix:   start with --lora-kernels torch" in msg
    assert "lora_shrink" not in msg  # the kernels that passed are not blamed


@needs_triton
def test_missing_c_compiler_when_triton_builds_its_launcher(monkeypatch):
    """What Triton raises on a host without a C compiler, the first time a kernel runs."""
    def no_compiler(*args, **kwargs):
        raise RuntimeError(NO_COMPILER_MESSAGE)

    monkeypatch.setattr(lora_triton, "_shrink_into", no_compiler)
    with pytest.raises(KernelCheckError) as err:
        check_kernels(CPU, torch.float32, "auto", backend="triton")
    msg = str(err.value)
    assert "cause: no C compiler: Triton compiles a small C launcher for each kernel" in msg
    assert "apt-get install gcc" in msg and "--lora-kernels torch" in msg
    assert msg.count("cause:") == 1  # three probes, one cause: said once


@needs_triton
def test_missing_c_compiler_is_found_before_compiling_on_cuda(no_compilers):
    """On CUDA the check looks for Triton's toolchain first (as triton/runtime/build.py does), so the
    message comes without a compile attempt; nothing here touches a GPU."""
    problem = kernel_check.triton_toolchain_problem()
    assert problem is not None and problem[0].startswith("no C compiler found")
    assert "apt-get install gcc" in problem[1]
    results = check_triton(torch.device("cuda"), torch.bfloat16)
    assert len(results) == 1 and results[0].kind == "unavailable"
    with pytest.raises(KernelCheckError) as err:
        check_kernels(torch.device("cuda"), torch.bfloat16, "auto")
    assert "no C compiler found" in str(err.value) and "--lora-kernels torch" in str(err.value)


def test_cc_that_is_not_a_compiler(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/gcc-13")
    cause, fix = kernel_check.triton_toolchain_problem()
    assert "CC='/nonexistent/gcc-13' is not an executable C compiler" in cause and "point CC at" in fix


def test_torch_mode_switches_every_fast_kernel_off_and_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="loragate.engine"):
        report = check_kernels(CPU, torch.float32, "torch")
    assert report.mode == "torch" and not report.results
    assert not lora_dispatch.triton_available()
    for lib in kernel_check.NATIVE_LIBRARIES:
        assert not native.use_native(torch.zeros(1), lib)
        assert native.load(lib).error == "disabled: --lora-kernels torch"
    assert "torch path on cpu (--lora-kernels torch)" in caplog.text
    check_kernels(CPU, torch.float32, "auto")  # the next check re-enables what passes
    if lora_triton is not None:
        assert lora_dispatch.triton_available()


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="--lora-kernels"):
        check_kernels(CPU, torch.float32, "fast")


# ---- the native CPU kernels ---------------------------------------------------------------------


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_probes_pass(dtype):
    report = check_kernels(CPU, dtype, "auto")
    names = [r.name for r in report.results]
    assert names[0] == "native lora" and "native decode_attention" in names
    # the chunk kernel takes bf16 only: probed in bf16 wherever it runs
    chunks = dtype == torch.bfloat16 and chunk_attention.path() is not None
    assert ("native chunk_attention" in names) == chunks and len(names) == 6 + chunks
    assert all(r.ok for r in report.results), [r.cause for r in report.failures]
    assert not report.fallback


def test_no_cpp_compiler_falls_back_to_torch_and_says_why(no_compilers, caplog):
    """pip install on a host without a compiler is supported: not fatal on the CPU, but said."""
    with caplog.at_level(logging.WARNING, logger="loragate.engine"):
        report = check_kernels(CPU, torch.float32, "auto")
    assert report.fallback == ["lora", "elementwise", "decode_attention"]
    assert all(r.kind == "unavailable" for r in report.results)
    assert "no C++ compiler found" in caplog.text and "apt-get install g++" in caplog.text
    assert not native.use_native(torch.zeros(1), "elementwise")
    assert "torch path for lora, elementwise, decode_attention" in report.summary()


@needs_compiler
def test_wrong_native_results_refuse_to_start(monkeypatch):
    real = elementwise.silu_mul_native
    monkeypatch.setattr(elementwise, "silu_mul_native", lambda gu: real(gu) * 1.5)
    with pytest.raises(KernelCheckError) as err:
        check_kernels(CPU, torch.float32, "auto")
    msg = str(err.value)
    assert "native CPU kernels failed their start-up self-check on this CPU (cpu, float32)" in msg
    assert "cause: native elementwise.silu_mul (float32) differs from its torch reference" in msg
    assert "--lora-kernels torch" in msg


@needs_compiler
def test_native_kernel_that_raises_is_a_failure(monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("native decode attention failed (code -2: index out of range)")

    monkeypatch.setattr("loragate.kernels.decode_attention.decode_attention_native", crash)
    with pytest.raises(KernelCheckError, match="cause: RuntimeError: native decode attention failed"):
        check_kernels(CPU, torch.float32, "auto")


# ---- the engine and the CLI ---------------------------------------------------------------------


@needs_compiler
def test_engine_refuses_to_start_and_torch_mode_serves(monkeypatch, checkpoints, tmp_path):
    from loragate.testing import build_adapter

    base = checkpoints("llama3")
    ad = build_adapter(base, tmp_path / "a", rank=4, targets=("q_proj", "v_proj"), seed=1)
    real = elementwise.silu_mul_native
    monkeypatch.setattr(elementwise, "silu_mul_native", lambda gu: real(gu) + 1.0)
    with pytest.raises(KernelCheckError, match="elementwise.silu_mul"):
        make_engine(base, adapters=(("a", str(ad)),))
    engine = make_engine(base, adapters=(("a", str(ad)),), lora_kernels="torch")
    try:
        assert engine.kernels.mode == "torch"
        outs = run_to_completion(engine, {0: [request([5, 6, 7], adapter="a", max_tokens=4, ignore_eos=True)]})
        assert len(tokens(next(iter(outs.values())))) == 4
    finally:
        engine.shutdown()


@needs_compiler
def test_cli_refusal_names_cause_and_fix_without_a_traceback(monkeypatch, capsys, checkpoints):
    real = elementwise.add_rms_norm_native
    monkeypatch.setattr(elementwise, "add_rms_norm_native", lambda h, d, w, eps: real(h, d, w, eps) * 0)
    rc = cli.main(["serve", "--model", str(checkpoints("llama3")), "--device", "cpu", "--dtype", "float32",
                   "--kv-cache-memory", "8MiB", "--log-level", "warning"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("loragate cannot start: the native CPU kernels failed their start-up self-check")
    assert "cause: native elementwise.rms_norm (float32)" in err and "fix:   start with --lora-kernels torch" in err
    assert "Traceback" not in err


# ---- warming ------------------------------------------------------------------------------------


def test_rank_buckets_follow_the_kernels_block_r():
    assert rank_buckets([8, 4, 16], 64) == [16]
    assert rank_buckets([8, 24, 64], 64) == [16, 32, 64]
    assert rank_buckets([], 64) == [16, 32, 64]  # unknown ranks: every bucket up to the limit
    assert rank_buckets([], 8) == [16]
    assert rank_buckets([100], 64) == [16, 32, 64]  # a rank past the limit is refused at load anyway


@needs_triton
def test_warm_launches_each_variant_on_the_engine_slots(monkeypatch):
    """warm_triton launches every (group, BLOCK_M, BLOCK_R) once and leaves the slots' zeros alone
    (run interpreted on CPU slot buffers here; on CUDA the same launches compile)."""
    from loragate.engine.model.lora import LoraWeights, group_specs

    launches = []
    real = lora_triton.add_lora_triton

    def spy(y, x, A, B, offsets, layout):
        launches.append((x.shape[1], y.shape[1], layout.max_seg_len, layout.max_rank))
        real(y, x, A, B, offsets, layout)
        assert torch.all(y == 0)

    monkeypatch.setattr(lora_triton, "add_lora_triton", spy)
    lora = LoraWeights(group_specs(32, 32, 16, 48), 1, 2, 8, CPU, torch.float32, groups=("qkv", "down"))
    n, seconds = kernel_check.warm_triton(lora, ranks=[4])
    assert n == len(launches) == 2 * 3 and seconds >= 0
    assert {(i, o) for i, o, _, _ in launches} == {(32, 64), (48, 32)}
    assert sorted({m for _, _, m, _ in launches}) == [1, 48, 320]  # BLOCK_M 16, 32, 64
    assert {r for *_, r in launches} == {8}
