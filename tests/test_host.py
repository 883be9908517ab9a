"""Host abilities and the compute dtype that follows: the decision as a pure function of the CPU's
flags (every combination), real /proc/cpuinfo lines, and what a served engine reports."""
from __future__ import annotations

import itertools

import pytest
import torch

from loragate.engine import host
from loragate.engine.host import CpuFeatures, choose_dtype, parse_cpuinfo

FLAG_NAMES = {"avx2": ("avx2", "fma3"), "avx512": ("avx512_f", "avx512_bw", "avx512_vl"),
              "avx512_bf16": ("avx512_bf16",), "amx": ("amx_bf16", "amx_tile"), "arm_bf16": ("bf16",)}
COMBINATIONS = list(itertools.product([False, True], repeat=len(FLAG_NAMES)))
ONEDNN_CAPS = [None, "AVX2", "avx512_core", "AVX512_CORE_BF16", "AVX512_CORE_AMX", "ALL"]
CAPPED_BELOW_BF16 = {"AVX2", "avx512_core"}


def features(combo: tuple[bool, ...], cap: str | None = None) -> CpuFeatures:
    flags = [f for on, names in zip(combo, FLAG_NAMES.values()) if on for f in names]
    return CpuFeatures.from_flags(flags + ["sse2", "avx"], cap)


@pytest.mark.parametrize("cap", ONEDNN_CAPS)
@pytest.mark.parametrize("combo", COMBINATIONS, ids=lambda c: "".join("1" if x else "0" for x in c))
def test_every_flag_combination(combo, cap):
    """Native bf16 is AVX-512 BF16, AMX or Arm BF16, unless oneDNN is capped below its bf16
    kernels; AVX2 and AVX-512 alone do not make bf16 fast. The dtype follows on the CPU only."""
    on = dict(zip(FLAG_NAMES, combo))
    f = features(combo, cap)
    fast_bf16 = (on["avx512_bf16"] or on["amx"] or on["arm_bf16"]) and cap not in CAPPED_BELOW_BF16
    assert f.native_bf16 == fast_bf16
    assert f.kernel_isa == ("avx512" if on["avx512"] else "avx2" if on["avx2"] else "portable")
    for ckpt in (torch.bfloat16, torch.float16):
        choice = choose_dtype("auto", ckpt, "cpu", f)
        assert choice.dtype == (torch.bfloat16 if fast_bf16 else torch.float32), choice
        if fast_bf16:  # the reason names the instructions that decided it
            assert ("AMX" if on["amx"] else "AVX-512 BF16" if on["avx512_bf16"] else "Arm BF16") in choice.reason
        elif cap in CAPPED_BELOW_BF16 and (on["avx512_bf16"] or on["amx"] or on["arm_bf16"]):
            assert "ONEDNN_MAX_CPU_ISA" in choice.reason
        else:
            assert "no native bf16" in choice.reason
    # a float32 checkpoint (or one naming no dtype) stays float32 on any CPU
    assert choose_dtype("auto", torch.float32, "cpu", f).dtype == torch.float32
    assert choose_dtype("auto", None, "cpu", f).dtype == torch.float32
    # the user's explicit choice wins everywhere; CUDA keeps the checkpoint's dtype
    for name, dtype in host.DTYPES.items():
        assert choose_dtype(name, torch.bfloat16, "cpu", f) == host.DtypeChoice(dtype, f"--dtype {name}")
        assert choose_dtype("auto", dtype, "cuda", f).dtype == dtype


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="unknown dtype"):
        choose_dtype("int8", torch.bfloat16, "cpu", CpuFeatures())


# /proc/cpuinfo flag lines of three kinds of host (abridged to the vector extensions and a few others)
ZEN2 = """processor\t: 0
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse sse2 ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c bmi1 avx2 bmi2 sha_ni
"""
ZEN4 = """model name\t: AMD EPYC 9B14
flags\t\t: sse sse2 fma avx f16c avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16 avx512_vnni
"""
SAPPHIRE_RAPIDS = """model name\t: Intel(R) Xeon(R) Platinum 8481C
flags\t\t: sse2 fma avx f16c avx2 avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
"""
GRAVITON3 = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm sve bf16 i8mm
"""


@pytest.mark.parametrize("text,model,bf16,isa,extensions", [
    (ZEN2, "AMD EPYC 7B12", False, "avx2", "AVX2; no AVX-512, AVX-512 BF16, AMX"),
    (ZEN4, "AMD EPYC 9B14", True, "avx512", "AVX2, AVX-512, AVX-512 BF16; no AMX"),
    (SAPPHIRE_RAPIDS, "Intel(R) Xeon(R) Platinum 8481C", True, "avx512", "AVX2, AVX-512, AVX-512 BF16, AMX"),
    (GRAVITON3, None, True, "portable", "Arm BF16; no AVX2, AVX-512, AVX-512 BF16, AMX"),
])
def test_real_cpuinfo_lines(text, model, bf16, isa, extensions):
    flags, name = parse_cpuinfo(text)
    f = CpuFeatures.from_flags(flags)
    assert name == model
    assert (f.native_bf16, f.kernel_isa, f.extensions()) == (bf16, isa, extensions)
    assert choose_dtype("auto", torch.bfloat16, "cpu", f).dtype == (torch.bfloat16 if bf16 else torch.float32)


def test_an_avx2_host_serves_a_bf16_checkpoint_in_float32(checkpoints, monkeypatch, tmp_path):
    """The issue's host: a bf16 checkpoint at --dtype auto on a CPU without native bf16 runs in
    float32, says why, and its adapters are float32 too; an explicit --dtype still wins."""
    from loragate.engine.adapters.peft_loader import load_peft_adapter
    from loragate.engine.config import EngineConfig
    from loragate.engine.engine import Engine
    from loragate.testing import build_adapter

    flags, _ = parse_cpuinfo(ZEN2)
    monkeypatch.setattr(host, "detect", lambda: host.HostInfo("AMD EPYC 7B12", "x86_64", 2,
                                                               CpuFeatures.from_flags(flags), "AVX2", None))
    base = checkpoints("llama3", dtype="bfloat16")
    engine = Engine(EngineConfig(model=str(base), device="cpu", kv_cache_memory=4 << 20, max_loras=2,
                                 max_lora_rank=8))
    assert engine.dtype == torch.float32
    assert engine.model.embed.dtype == torch.float32
    # a bf16 adapter is converted once, when read: the CPU tier and the slots hold float32, so no
    # step converts it again (the native LoRA kernel refuses mixed dtypes outright)
    adapter = build_adapter(base, tmp_path / "ad", rank=4, targets=("q_proj", "down_proj"), dtype="bfloat16")
    loaded = load_peft_adapter(adapter, "ad", engine.base_info, max_rank=8)
    assert {t.dtype for pair in loaded.weights.values() for t in pair} == {torch.float32}
    engine.lora.write_slot(0, loaded.weights, loaded.rank, loaded.scale)
    assert {t.dtype for layer in engine.lora.A + engine.lora.B for t in layer.values()} == {torch.float32}
    assert engine.host_info["dtype"] == "float32" and "no native bf16" in engine.host_info["dtype_reason"]
    assert "compute dtype float32" in host.summary_line(engine.host_info)
    explicit = Engine(EngineConfig(model=str(base), device="cpu", dtype="bfloat16", kv_cache_memory=4 << 20,
                                   enable_lora=False))
    assert explicit.dtype == torch.bfloat16 and explicit.host_info["dtype_reason"] == "--dtype bfloat16"


def test_detect_reads_this_host_once():
    info = host.detect()
    assert info is host.detect()
    assert info.cpu_model and info.cores >= 1
    # what torch itself dispatches to agrees with the flags read (AVX-512 implies AVX2)
    if info.features.avx512:
        assert info.features.avx2
