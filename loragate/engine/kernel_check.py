"""Start-up self-check of the fast kernels against their torch references: one mechanism for the
Triton LoRA kernels (CUDA) and the native C++ kernels (CPU).

Why at start-up: the fast kernels depend on the host in ways no install step checks. Triton
compiles a small C launcher for each kernel the first time it runs, so an image without a C
compiler (or without Python's headers) fails on the first adapter request; a GPU that Triton cannot
compile for fails there too; the native CPU kernels need a C++ compiler and are built for the
host's own CPU. Each probe runs one kernel on tiny shapes and compares it with the torch path the
engine would otherwise take. On a failure the engine refuses to start with a message that names the
cause and the fix (`KernelCheckError`), or, under `--lora-kernels torch`, takes the torch path and
says so. One exception: on the CPU a native library that could not be *built* (no compiler) is not
fatal: `pip install` on a host without a compiler is supported, the torch path serves, and the log
says why and how to get the faster kernels. A library that built but computes wrong results is.

On CUDA the check also warms the Triton kernels (`warm_triton`): the variants the model's shapes
and the registered adapters' ranks will launch are compiled before the server reports ready, so the
first adapter request does not pay the compile (measured 3.8 s on the first GPU run).

The choice is process-wide (`loragate.kernels.lora.disable_triton`, `loragate.kernels.native.disable`):
one engine serves per process. Each check starts by re-enabling what an earlier one switched off.
"""
from __future__ import annotations

import logging
import os
import shutil
import sysconfig
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from loragate.kernels import lora as lora_dispatch
from loragate.kernels import native
from loragate.kernels.layout import LoraBatchLayout, Segment
from loragate.kernels.lora_ref import add_lora_ref, lora_expand_ref, lora_shrink_ref

log = logging.getLogger("loragate.engine")

LORA_KERNELS = ("auto", "torch")
NATIVE_LIBRARIES = ("lora", "elementwise", "decode_attention", "chunk_attention")
TORCH_FLAG = "--lora-kernels torch"
# max |error| allowed, as (atol, rtol): kernels and references round differently in 16-bit types;
# a wrong kernel (a slot, a rank, a scale, a stride) is off by O(1)
TOLERANCE = {torch.float32: (1e-3, 1e-3), torch.bfloat16: (6e-2, 3e-2), torch.float16: (2e-2, 1e-2)}


class KernelCheckError(RuntimeError):
    """The fast kernels failed their self-check; the message names the cause and the fix."""


@dataclass(frozen=True)
class ProbeResult:
    """One kernel's check: ok, or why not (`kind`: unavailable | error | mismatch)."""

    name: str  # e.g. "triton add_lora", "native elementwise.rms_norm"
    library: str  # "triton" or a native library name
    ok: bool
    seconds: float
    kind: str = "ok"
    cause: str | None = None
    fix: str | None = None


@dataclass
class KernelReport:
    """What the self-check found and what the engine runs as a result."""

    device: str
    dtype: torch.dtype
    mode: str  # auto | torch
    results: list[ProbeResult] = field(default_factory=list)
    seconds: float = 0.0
    fallback: list[str] = field(default_factory=list)  # libraries on the torch path after the check
    warm_seconds: float | None = None
    warm_launches: int = 0

    @property
    def failures(self) -> list[ProbeResult]:
        return [r for r in self.results if not r.ok]

    def summary(self) -> str:
        """One line for the start-up log."""
        dt = str(self.dtype).replace("torch.", "")
        if self.mode == "torch":
            return (f"kernels: torch path on {self.device} ({TORCH_FLAG}): the "
                    f"{'Triton LoRA' if self.device == 'cuda' else 'native CPU'} kernels are not used")
        passed = [r.name for r in self.results if r.ok]
        line = (f"kernel self-check ({self.device}, {dt}): {len(passed)}/{len(self.results)} kernels match their "
                f"torch reference in {self.seconds:.2f} s")
        if self.fallback:
            line += f"; torch path for {', '.join(self.fallback)}"
        if self.warm_seconds is not None:
            line += (f"; Triton warmed for this model's shapes ({self.warm_launches} launches, compiled or loaded "
                     f"from Triton's cache) in {self.warm_seconds:.2f} s")
        return line


# ---- what went wrong, in words -------------------------------------------------------------------


def _gpu_words(device: torch.device) -> str:
    try:
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    except Exception:  # noqa: BLE001 - only decorates a message
        return "this GPU"


def triton_toolchain_problem() -> tuple[str, str] | None:
    """(cause, fix) when Triton could not build its kernel launchers here, else None. Mirrors what
    Triton itself needs (triton/runtime/build.py): `$CC`, else gcc or clang on PATH, and Python.h."""
    cc = os.environ.get("CC")
    if cc and not shutil.which(cc):
        return (f"CC={cc!r} is not an executable C compiler; Triton compiles a small C launcher for each "
                "kernel the first time it runs",
                f"point CC at a C compiler (or unset it and install gcc), or start with {TORCH_FLAG}")
    if not cc and shutil.which("gcc") is None and shutil.which("clang") is None:
        return ("no C compiler found (gcc or clang on PATH, or $CC): Triton compiles a small C launcher "
                "for each kernel the first time it runs",
                "install one (Debian/Ubuntu: apt-get install gcc; the Dockerfile's image has it) or set CC; "
                f"or start with {TORCH_FLAG} to serve LoRA through the slower torch path")
    include = sysconfig.get_paths().get("include") or ""
    if not os.path.isfile(os.path.join(include, "Python.h")):
        return (f"Python's C headers are missing ({include}/Python.h): Triton compiles its kernel launcher "
                "against them",
                "install them (Debian/Ubuntu: apt-get install python3-dev, for this interpreter's version), or "
                f"start with {TORCH_FLAG}")
    return None


def _classify_triton_error(exc: BaseException, device: torch.device) -> tuple[str, str, str]:
    """(kind, cause, fix) of an exception raised while compiling or running a Triton kernel."""
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0][:400] if text else type(exc).__name__
    if "Failed to find C compiler" in text:
        return ("unavailable", "no C compiler: Triton compiles a small C launcher for each kernel the first time "
                f"it runs ({first})",
                f"install one (apt-get install gcc) or set CC; or start with {TORCH_FLAG}")
    if "Python.h" in text:
        return ("unavailable", f"Python's C headers are missing ({first})",
                f"install them (apt-get install python3-dev) or start with {TORCH_FLAG}")
    where = _gpu_words(device) if device.type == "cuda" else str(device)
    fix = f"start with {TORCH_FLAG}"
    if device.type == "cuda":
        try:
            if torch.cuda.get_device_capability(device)[0] < 8:
                fix = (f"Triton supports NVIDIA GPUs of compute capability 8.0 and newer: start with {TORCH_FLAG} "
                       "on this GPU")
        except Exception:  # noqa: BLE001
            pass
        fix += "; if the GPU is supported, check that triton matches torch (pip show triton torch)"
    return "error", f"Triton could not compile or run the LoRA kernels on {where}: {first}", fix


def _mismatch(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> str | None:
    """None when close enough, else the error in words."""
    atol, rtol = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != e.shape:
        return f"shape {tuple(a.shape)} instead of {tuple(e.shape)}"
    if not torch.isfinite(a).all():
        return "non-finite outputs"
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    if bool(bad.any()):
        return f"max |error| {err.max().item():.3g} ({int(bad.sum())} of {a.numel()} values past tolerance {atol:g})"
    return None


# ---- probes --------------------------------------------------------------------------------------
# Each probe builds tiny random inputs and returns (actual, expected) from the fast kernel and the
# torch path. Shapes are chosen to reach the kernels' edges: widths that are not multiples of the
# block sizes, several slices, ranks 1..16 in one batch, one-token segments beside a long one that
# spans row blocks, base-model tokens in between.

_SLOTS, _RANK = 4, 16
_RANKS = [1, 3, 8, 16]
_SCALES = [0.5, 2.0, 1.0, 0.25]
_IN, _OUTS = 40, (40, 24, 24)
_TOKEN_SLOTS = [0, -1, 2] + [1] * 37 + [-1, 3, 2, 2, -1, 0]
_SHORT_TOKEN_SLOTS = [0, -1, 2, 1, 1, -1, 3, 2, 2, -1, 0]  # every segment short: the native kernel's case


def _offsets(outs: tuple[int, ...]) -> tuple[int, ...]:
    offs = [0]
    for n in outs:
        offs.append(offs[-1] + n)
    return tuple(offs)


def _lora_inputs(device: torch.device, dtype: torch.dtype, token_slots: list[int], rank_major_b: bool = False):
    g = torch.Generator().manual_seed(0)
    N, T = sum(_OUTS), len(token_slots)
    A = torch.randn(_SLOTS, len(_OUTS), _RANK, _IN, generator=g) / _IN**0.5
    B = torch.randn(_SLOTS, N, _RANK, generator=g) / _RANK**0.5
    x = torch.randn(T, _IN, generator=g)
    y = torch.randn(T, N, generator=g)
    A, x, y = A.to(device, dtype), x.to(device, dtype), y.to(device, dtype)
    if rank_major_b:  # as the engine keeps B on the CPU (loragate.kernels.lora_cpu.rank_major)
        B = B.transpose(1, 2).contiguous().to(device, dtype).transpose(1, 2)
    else:
        B = B.to(device, dtype)
    layout = LoraBatchLayout.from_token_slots(token_slots, _RANKS, _SCALES, device)
    cpu_layout = LoraBatchLayout.from_token_slots(token_slots, _RANKS, _SCALES, "cpu")
    return A, B, x, y, layout, cpu_layout


def _f32(*ts: torch.Tensor) -> list[torch.Tensor]:
    """float32 CPU copies (always copies: the reference must not share memory with the kernel's
    in-place output)."""
    return [t.detach().to("cpu", torch.float32, copy=True) for t in ts]


def _triton_probes(device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[], tuple]]:
    from loragate.kernels import lora_triton

    offs = _offsets(_OUTS)

    def shrink():
        A, _, x, _, layout, cl = _lora_inputs(device, dtype, _TOKEN_SLOTS)
        xc, Ac = _f32(x, A)
        return lora_triton.lora_shrink_triton(x, A, layout), lora_shrink_ref(xc, Ac, cl)

    def expand():
        A, B, x, y, layout, cl = _lora_inputs(device, dtype, _TOKEN_SLOTS)
        xc, Ac, Bc, yc = _f32(x, A, B, y)
        t = lora_shrink_ref(xc, Ac, cl)
        lora_triton.lora_expand_triton(y, t.to(device), B, offs, layout)
        lora_expand_ref(yc, t, Bc, offs, cl)
        return y, yc

    def add_lora():
        A, B, x, y, layout, cl = _lora_inputs(device, dtype, _TOKEN_SLOTS)
        xc, Ac, Bc, yc = _f32(x, A, B, y)
        lora_triton.add_lora_triton(y, x, A, B, offs, layout)
        add_lora_ref(yc, xc, Ac, Bc, offs, cl)
        return y, yc

    return {"triton lora_shrink": shrink, "triton lora_expand": expand, "triton add_lora": add_lora}


def _native_probes(dtype: torch.dtype) -> dict[str, tuple[str, Callable[[], tuple]]]:
    """name -> (library, probe). References are the engine's own torch forms."""
    from loragate.engine.model.attention import (AttentionMetadata, PrefillChunk, decode_attention_torch,
                                                 paged_attention)
    from loragate.engine.model.llama import swiglu
    from loragate.engine.model.norm import RMSNorm
    from loragate.engine.model.rope import RotaryEmbedding
    from loragate.kernels import chunk_attention, decode_attention, elementwise, lora_cpu

    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(1)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=g)).to(dtype)

    def lora():
        A, B, x, y, layout, _ = _lora_inputs(cpu, dtype, _SHORT_TOKEN_SLOTS, rank_major_b=True)
        expected = y.clone()
        add_lora_ref(expected, x, A, B, _offsets(_OUTS), layout)
        lora_cpu.add_lora_native(y, x, A, B, _offsets(_OUTS), layout, tuple(range(len(_OUTS))), 64)
        return y, expected

    def rms_norm():
        h, delta, w = rnd(5, 72), rnd(5, 72), (1 + 0.1 * torch.randn(72, generator=g)).to(dtype)
        norm = RMSNorm(w, 1e-5)
        expected = norm.add_(h.clone(), delta)
        return elementwise.add_rms_norm_native(h, delta, w, 1e-5), expected

    def silu_mul():
        gu = rnd(5, 2 * 40, scale=4.0)
        return elementwise.silu_mul_native(gu), swiglu(gu, False)

    def rope():
        rot = RotaryEmbedding(16, 64, 10000.0, None, cpu, dtype)
        x = rnd(5, 3, 16)
        pos = torch.tensor([0, 7, 63, 1, 30])
        expected = rot.apply_(x.clone(), pos, rot.lookup(pos))
        elementwise.rope_native_(x, pos, rot.cos_half, rot.sin_half)
        return x, expected

    def argmax():
        x = rnd(4, 97)
        return elementwise.argmax_rows_native(x).double(), torch.argmax(x, dim=-1).double()

    def attention():
        Hq, Hk, D, block = 4, 2, 16, 4
        cache = rnd(2 * Hk, 12 * block, D)
        lens = [3, 9, 1]
        tables = [[5, 0, 7], [2, 11, 4], [9]]
        L = -(-max(lens) // block) * block
        index = torch.zeros(len(lens), L, dtype=torch.long)
        mask = torch.zeros(len(lens), 1, 1, L, dtype=torch.bool)
        for b, (n, table) in enumerate(zip(lens, tables)):
            pos = torch.arange(n)
            index[b, :n] = torch.tensor(table)[pos // block] * block + pos % block
            mask[b, ..., :n] = True
        meta = AttentionMetadata(slot_mapping=torch.zeros(len(lens), dtype=torch.long),
                                 decode_rows=torch.arange(len(lens)), decode_kv_index=index, decode_mask=mask,
                                 decode_lens=torch.tensor(lens))
        q = rnd(len(lens), Hq, D)
        return (decode_attention.decode_attention_native(q, cache, index, meta.decode_lens, D**-0.5),
                decode_attention_torch(q, cache, meta, D**-0.5))

    def chunks():
        # short chunks over cached context (row counts off the kernel's 5-row tiles) against SDPA per
        # chunk, the engine's form without the kernel; bf16 only, the kernel's one dtype
        Hq, Hk, D = 4, 2, 16
        cache = rnd(2 * Hk, 96, D)
        index = torch.randperm(96, generator=g)[:70]
        starts, lens, ctxs, offsets = [0, 9], [9, 17], [30, 40], [0, 30]
        plans = [PrefillChunk(s, s + n, index[o:o + c], fresh=False) for s, n, c, o in zip(starts, lens, ctxs, offsets)]
        slots = torch.cat([p.kv_index[-(p.end - p.start):] for p in plans])  # the chunks' own tokens
        meta = AttentionMetadata(slot_mapping=slots, prefills=plans)
        meta._chunk_plan = ([], plans)  # every chunk through SDPA alone
        q = rnd(sum(lens), Hq, D)
        expected = paged_attention(q, cache[:, slots].transpose(0, 1), cache.clone(), meta, D**-0.5, native=False)
        out = torch.zeros_like(q)
        i64 = lambda xs: torch.tensor(xs, dtype=torch.int64)
        chunk_attention.chunk_attention_native(q, cache, index, i64(starts), i64(lens), i64(ctxs), i64(offsets),
                                               D**-0.5, out)
        return out.view(expected.shape), expected

    probes = {
        "native lora": ("lora", lora),
        "native elementwise.rms_norm": ("elementwise", rms_norm),
        "native elementwise.silu_mul": ("elementwise", silu_mul),
        "native elementwise.rope": ("elementwise", rope),
        "native elementwise.argmax": ("elementwise", argmax),
        "native decode_attention": ("decode_attention", attention),
    }
    if dtype == torch.bfloat16 and chunk_attention.path() is not None:
        probes["native chunk_attention"] = ("chunk_attention", chunks)
    return probes


def _run_probe(name: str, library: str, probe: Callable[[], tuple], dtype: torch.dtype,
               on_error: Callable[[BaseException], tuple[str, str, str]]) -> ProbeResult:
    t0 = time.perf_counter()
    try:
        actual, expected = probe()
        if actual.device.type == "cuda":
            torch.cuda.synchronize(actual.device)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a reason
        kind, cause, fix = on_error(exc)
        return ProbeResult(name, library, False, time.perf_counter() - t0, kind, cause, fix)
    wrong = _mismatch(actual, expected, dtype)
    seconds = time.perf_counter() - t0
    if wrong is None:
        return ProbeResult(name, library, True, seconds)
    return ProbeResult(name, library, False, seconds, "mismatch",
                       f"{name} ({str(dtype).replace('torch.', '')}) differs from its torch reference: {wrong}",
                       f"start with {TORCH_FLAG} and report this (loragate version, GPU/CPU model, torch and triton "
                       "versions) to the project")


def check_triton(device: torch.device, dtype: torch.dtype) -> list[ProbeResult]:
    """The Triton LoRA kernels on `device` against the torch reference (compiled on CUDA, Triton's
    interpreter on the CPU). A missing toolchain is reported without trying to compile."""
    t0 = time.perf_counter()
    if not lora_dispatch.triton_available():
        try:
            import triton  # noqa: F401

            cause = "triton is installed but has no usable backend here"
        except Exception as exc:  # noqa: BLE001
            cause = f"triton cannot be imported ({type(exc).__name__}: {exc})"
        return [ProbeResult("triton", "triton", False, time.perf_counter() - t0, "unavailable", cause,
                            f"pip install triton (the version torch {torch.__version__} was built with), or start "
                            f"with {TORCH_FLAG}")]
    if device.type == "cuda":
        problem = triton_toolchain_problem()
        if problem is not None:
            return [ProbeResult("triton", "triton", False, time.perf_counter() - t0, "unavailable", *problem)]
    probes = _triton_probes(device, dtype)
    return [_run_probe(name, "triton", probe, dtype, lambda e: _classify_triton_error(e, device))
            for name, probe in probes.items()]


def check_native(dtype: torch.dtype) -> list[ProbeResult]:
    """The native CPU kernels against the engine's torch forms; a library that did not build is
    reported as unavailable with the build's own reason."""
    builds = native.load_all()
    results: list[ProbeResult] = []
    for name, (library, probe) in _native_probes(dtype).items():
        build = builds.get(library) or native.load(library)
        if build.library is None:
            no_compiler = native.compiler() is None
            fix = (f"install a C++ compiler (Debian/Ubuntu: apt-get install g++) or point {native.CXX_ENV} at one; "
                   "the torch path serves meanwhile" if no_compiler else
                   "report the build error to the project; the torch path serves meanwhile")
            results.append(ProbeResult(name, library, False, 0.0, "unavailable",
                                       f"the native kernel {library} is unavailable: {build.error}", fix))
            continue
        results.append(_run_probe(name, library, probe, dtype,
                                  lambda e: ("error", f"{type(e).__name__}: {e}",
                                             f"start with {TORCH_FLAG} and report this to the project")))
    return results


def _enable_all() -> None:
    lora_dispatch.enable_triton()
    for lib in NATIVE_LIBRARIES:
        native.enable(lib)


def check_kernels(device: torch.device, dtype: torch.dtype, mode: str = "auto",
                  backend: str | None = None) -> KernelReport:
    """Run the self-check for `device` and switch the process to what passed. Raises
    KernelCheckError when the fast kernels cannot be trusted (see the module docstring).

    `backend` defaults to the device's fast kernels ("triton" on CUDA, "native" on the CPU); tests
    pass "triton" on the CPU to run the Triton path through the interpreter."""
    if mode not in LORA_KERNELS:
        raise ValueError(f"--lora-kernels must be one of {LORA_KERNELS}, got {mode!r}")
    backend = backend or ("triton" if device.type == "cuda" else "native")
    report = KernelReport(device.type, dtype, mode)
    _enable_all()
    if mode == "torch":
        lora_dispatch.disable_triton(TORCH_FLAG)
        for lib in NATIVE_LIBRARIES:
            native.disable(lib, TORCH_FLAG)
        report.fallback = ["triton", *NATIVE_LIBRARIES]
        log.info(report.summary())
        return report
    t0 = time.perf_counter()
    report.results = check_triton(device, dtype) if backend == "triton" else check_native(dtype)
    report.seconds = time.perf_counter() - t0
    fatal = [r for r in report.failures if not (backend == "native" and r.kind == "unavailable")]
    if fatal:
        raise KernelCheckError(_refusal(report, fatal, device))
    for r in report.failures:  # native libraries that did not build: the torch path, said once
        if r.library not in report.fallback:
            report.fallback.append(r.library)
            log.warning("native CPU kernel %s unavailable, using the torch path. cause: %s. fix: %s",
                        r.library, r.cause, r.fix)
    return report


def _refusal(report: KernelReport, fatal: list[ProbeResult], device: torch.device) -> str:
    what = "Triton LoRA kernels" if fatal[0].library == "triton" else "native CPU kernels"
    where = _gpu_words(device) if device.type == "cuda" else "this CPU"
    lines = [f"loragate cannot start: the {what} failed their start-up self-check on {where} "
             f"({device.type}, {str(report.dtype).replace('torch.', '')})."]
    seen = set()
    for r in fatal:
        if (r.cause, r.fix) in seen:
            continue
        seen.add((r.cause, r.fix))
        lines.append(f"  cause: {r.cause}")
        lines.append(f"  fix:   {r.fix}")
    return "\n".join(lines)


# ---- warming the Triton kernels ------------------------------------------------------------------


def rank_buckets(ranks: Iterable[int], max_rank: int) -> list[int]:
    """The BLOCK_R values a batch of these adapter ranks launches with (lora_triton: the next power
    of two of the batch's largest rank, at least 16). Without known ranks: every bucket up to
    `max_rank`."""
    def bucket(r: int) -> int:
        return max(16, 1 << (max(int(r), 1) - 1).bit_length())

    known = sorted({bucket(r) for r in ranks if 0 < r <= max_rank})
    if known:
        return known
    out, b = [], 16
    while b < bucket(max_rank):
        out.append(b)
        b *= 2
    return [*out, bucket(max_rank)]


# rows per segment that select each BLOCK_M of lora_triton._block_m (decode, prefill, long prefill)
WARM_SEGMENT_LENGTHS = (1, 48, 320)


def warm_triton(lora, ranks: Iterable[int], groups: Iterable[str] | None = None) -> tuple[int, float]:
    """Launch the Triton kernels once per (group, BLOCK_M, BLOCK_R) on the engine's own slot
    buffers (zeros: nothing changes) so each variant is compiled, or loaded from Triton's disk cache,
    before the first request. Returns (launches, seconds)."""
    from loragate.kernels import lora_triton

    t0 = time.perf_counter()
    device, dtype = lora.device, lora.dtype
    launches = 0
    for group in (groups if groups is not None else lora.A[0].keys()):
        if group not in lora.A[0]:
            continue
        spec = lora.specs[group]
        A, B = lora.A[0][group], lora.B[0][group]
        for rank in rank_buckets(ranks, lora.max_rank):
            r = min(rank, lora.max_rank)
            for length in WARM_SEGMENT_LENGTHS:
                layout = LoraBatchLayout.from_segments(length, [Segment(0, length, 0, r, 1.0)], device)
                x = torch.zeros(length, spec.in_dim, device=device, dtype=dtype)
                y = torch.zeros(length, spec.out_dim, device=device, dtype=dtype)
                lora_triton.add_lora_triton(y, x, A, B, spec.slice_offsets, layout)
                launches += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return launches, time.perf_counter() - t0


def warm_for_engine(report: KernelReport | None, lora, ranks: Iterable[int]) -> None:
    """Warm the Triton kernels for the engine's slots when it runs them (CUDA, check passed); a
    failure here is a failed self-check too (a shape the tiny probes did not reach)."""
    if report is None or lora.device.type != "cuda" or report.mode == "torch" \
            or not lora_dispatch.triton_available():
        return
    try:
        report.warm_launches, report.warm_seconds = warm_triton(lora, ranks)
    except Exception as exc:  # noqa: BLE001
        kind, cause, fix = _classify_triton_error(exc, lora.device)
        raise KernelCheckError(_refusal(report, [ProbeResult("triton warm-up", "triton", False, 0.0, kind, cause, fix)],
                                        lora.device)) from exc
