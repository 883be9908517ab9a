"""What is fast on this host, answered once: the CPU's vector extensions, whether it multiplies
bf16 natively, the C++ compiler and the path the native kernels compiled to; and the compute dtype
that follows.

Why it matters: bf16 halves the bytes every decode step reads, but only a CPU with bf16 dot-product
instructions (AVX-512 BF16, AMX, Armv8.6 BF16) multiplies it at float32's rate or better; elsewhere
oneDNN and torch convert every element in software, and a bf16 model decodes several times slower
than the same model in float32 (measured: 5.5x at 32 streams on an AVX2 EPYC). So on the CPU
`--dtype auto` follows the host, not the checkpoint.

Decided from the CPU's feature flags alone (torch's own report, `torch.cpu.get_capabilities()`,
which reads CPUID on every OS; `/proc/cpuinfo` where that is missing), without timing anything at
start-up: the flags name exactly the instructions oneDNN picks its bf16 kernels by, so they cannot
disagree with what it will run, and a calibration would cost seconds of every start and be as noisy
as the host (on a shared VM, ±30% between two runs of the same step). The one thing flags do not
say is a cap put on oneDNN by `ONEDNN_MAX_CPU_ISA` (or `DNNL_MAX_CPU_ISA`): a cap below its bf16
kernels counts as no native bf16.
"""
from __future__ import annotations

import logging
import os
import platform
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger("loragate.host")

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA values) below its first bf16 dot-product kernels
_ONEDNN_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                                  "AVX512_CORE_VNNI", "AVX512_MIC", "AVX512_MIC_4OPS"})
# /proc/cpuinfo's names -> torch.cpu.get_capabilities()'s, for the flags read here
_CPUINFO_NAMES = {"avx512f": "avx512_f", "avx512bw": "avx512_bw", "avx512vl": "avx512_vl", "avx512dq": "avx512_dq",
                  "avx512_bf16": "avx512_bf16", "amx_bf16": "amx_bf16", "amx_tile": "amx_tile", "fma": "fma3",
                  "avx2": "avx2", "f16c": "f16c", "bf16": "bf16", "sve": "sve"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU flags that decide the compute dtype and the native kernels' path."""

    avx2: bool = False  # AVX2 with FMA
    avx512: bool = False  # AVX-512 F, BW and VL
    avx512_bf16: bool = False
    amx_bf16: bool = False  # AMX tiles with bf16
    arm_bf16: bool = False  # Armv8.6 BF16 (BFDOT, BFMMLA)
    onednn_bf16: bool = True  # no ONEDNN_MAX_CPU_ISA cap below oneDNN's bf16 kernels

    @property
    def native_bf16(self) -> bool:
        """Whether bf16 matmuls run on bf16 dot-product instructions here."""
        return (self.avx512_bf16 or self.amx_bf16 or self.arm_bf16) and self.onednn_bf16

    @property
    def kernel_isa(self) -> str:
        """The path `-march=native` compiles the native kernels to (csrc/isa.h)."""
        return "avx512" if self.avx512 else "avx2" if self.avx2 else "portable"

    def extensions(self) -> str:
        """'AVX2, AVX-512, AVX-512 BF16; no AMX': what bench headers and /health print."""
        have = {"AVX2": self.avx2, "AVX-512": self.avx512, "AVX-512 BF16": self.avx512_bf16, "AMX": self.amx_bf16}
        if self.arm_bf16:
            have["Arm BF16"] = True
        yes = [k for k, v in have.items() if v]
        no = [k for k, v in have.items() if not v]
        text = ", ".join(yes) or "none of AVX2/AVX-512/AMX"
        if no and yes:
            text += "; no " + ", ".join(no)
        if not self.onednn_bf16:
            text += " (oneDNN capped below bf16)"
        return text

    @classmethod
    def from_flags(cls, flags: Iterable[str], onednn_max_isa: str | None = None) -> CpuFeatures:
        """From feature names as torch.cpu.get_capabilities() spells them (avx512_f, fma3, ...)."""
        f = set(flags)
        cap = (onednn_max_isa or "").strip().upper()
        return cls(
            avx2="avx2" in f and "fma3" in f,
            avx512={"avx512_f", "avx512_bw", "avx512_vl"} <= f,
            avx512_bf16="avx512_bf16" in f,
            amx_bf16="amx_bf16" in f and "amx_tile" in f,
            arm_bf16="bf16" in f,
            onednn_bf16=cap not in _ONEDNN_WITHOUT_BF16,
        )


@dataclass(frozen=True)
class HostInfo:
    """This host, as detected once at start-up."""

    cpu_model: str
    arch: str
    cores: int
    features: CpuFeatures
    torch_capability: str  # the ISA torch's own vectorised ops dispatch to (ATEN_CPU_CAPABILITY)
    compiler: str | None  # the C++ compiler the native kernels build with

    def describe(self) -> str:
        """One line for logs and bench headers."""
        return f"{self.cpu_model} ({self.arch}, {self.cores} cores): {self.features.extensions()}"


@dataclass(frozen=True)
class DtypeChoice:
    """The compute dtype and why (logged at start-up, shown by /health)."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def choose_dtype(requested: str, checkpoint_dtype: torch.dtype | None, device_type: str,
                 features: CpuFeatures) -> DtypeChoice:
    """The compute dtype: the user's when given; on CUDA the checkpoint's; on the CPU bf16 only
    where the CPU multiplies bf16 natively (and the checkpoint is not float32), float32 otherwise.
    A pure function of its arguments, so every combination is tested."""
    if requested != "auto":
        if requested not in DTYPES:
            raise ValueError(f"unknown dtype {requested!r}; choose auto, bfloat16, float16 or float32")
        return DtypeChoice(DTYPES[requested], f"--dtype {requested}")
    ckpt = checkpoint_dtype or torch.float32
    ckpt_name = str(ckpt).removeprefix("torch.")
    if device_type != "cpu":
        return DtypeChoice(ckpt, f"the checkpoint's dtype ({ckpt_name}) on {device_type}")
    if ckpt == torch.float32:
        return DtypeChoice(torch.float32, "the checkpoint is float32" if checkpoint_dtype is not None
                           else "the checkpoint names no dtype (float32)")
    if features.native_bf16:
        which = ("AMX" if features.amx_bf16 else "AVX-512 BF16" if features.avx512_bf16 else "Arm BF16")
        return DtypeChoice(torch.bfloat16, f"{ckpt_name} checkpoint and a CPU with native bf16 matmul ({which})")
    has_bf16 = features.avx512_bf16 or features.amx_bf16 or features.arm_bf16
    why = ("oneDNN is capped below its bf16 kernels (ONEDNN_MAX_CPU_ISA)" if has_bf16
           else "the CPU has no native bf16 matmul (no AVX-512 BF16 or AMX), where bf16 runs several times "
                "slower than float32")
    return DtypeChoice(torch.float32, f"{ckpt_name} checkpoint but {why}")


def parse_cpuinfo(text: str) -> tuple[set[str], str | None]:
    """Feature names (in torch's spelling) and the model name from /proc/cpuinfo's text."""
    flags: set[str] = set()
    model = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features") and not flags:
            flags = {_CPUINFO_NAMES.get(x, x) for x in value.split()}
        elif key == "model name" and model is None:
            model = value.strip()
    return flags, model


def _cpuinfo() -> tuple[set[str], str | None]:
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        return set(), None


def _torch_capabilities() -> Mapping[str, object]:
    get = getattr(getattr(torch, "cpu", None), "get_capabilities", None)
    try:
        return get() if get is not None else {}
    except Exception:  # noqa: BLE001 - an older torch or an unknown CPU: fall back to /proc/cpuinfo
        return {}


@lru_cache(maxsize=1)
def detect() -> HostInfo:
    """This host's abilities (computed once per process)."""
    from loragate.kernels import native

    caps = _torch_capabilities()
    flags, model = _cpuinfo()
    flags |= {k for k, v in caps.items() if v is True}
    onednn_cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - reporting only
        capability = "unknown"
    return HostInfo(
        cpu_model=str(model or caps.get("cpu_name") or platform.processor() or platform.machine()),
        arch=platform.machine(),
        cores=os.cpu_count() or 1,
        features=CpuFeatures.from_flags(flags, onednn_cap),
        torch_capability=capability,
        compiler=native.compiler(),
    )


def kernel_isa() -> str:
    """Which CPU kernels run: the path the native ones compiled to (avx512, avx2, portable), or
    why the torch ops run instead. Builds them if no one has yet."""
    from loragate.kernels import native

    if os.environ.get(native.BACKEND_ENV, "").strip().lower() == "torch":
        return f"torch ops ({native.BACKEND_ENV}=torch)"
    builds = native.load_all()
    paths = sorted({b.isa for b in builds.values() if b.library is not None and b.isa})
    failed = sorted(name for name, b in builds.items() if b.library is None)
    if not paths:
        return "torch ops (native kernels unavailable: " + next(iter(builds.values())).error + ")"
    text = ", ".join(paths) + f" ({native.target()} build)"
    return text + (f"; torch ops for {', '.join(failed)}" if failed else "")


def summary(choice: DtypeChoice, device_type: str) -> dict[str, object]:
    """What /health and the start-up log show about the host and the dtype chosen for it."""
    info = detect()
    out: dict[str, object] = {"device": device_type, "dtype": choice.name, "dtype_reason": choice.reason,
                              "cpu": info.cpu_model, "vector_extensions": info.features.extensions(),
                              "native_bf16": info.features.native_bf16}
    if device_type == "cpu":
        out["cpu_kernels"] = kernel_isa()
    return out


def summary_line(info: dict[str, object]) -> str:
    """`summary()` as the one start-up log line."""
    line = (f"compute dtype {info['dtype']} on {info['device']} ({info['dtype_reason']}); "
            f"CPU {info['cpu']}: {info['vector_extensions']}")
    if "cpu_kernels" in info:
        line += f"; native CPU kernels: {info['cpu_kernels']}"
    return line
