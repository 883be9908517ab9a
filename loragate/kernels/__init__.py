"""Kernels: pure functions on tensors (imports nothing from engine/gateway).

Batched multi-adapter LoRA: `add_lora` is what the model calls per projection group;
`lora_shrink`/`lora_expand` are its two halves. They dispatch to Triton on CUDA and, on the CPU,
to a native kernel (`lora_cpu`) or the torch reference (`lora_ref`); see `lora.py`.
The CPU's native decode attention (`decode_attention`) and row-wise ops (`elementwise`) live here
too, C++ in `csrc/` built by `native`; their torch references are the engine's own torch forms.
"""
from loragate.kernels.layout import LoraBatchLayout, Segment
from loragate.kernels.lora import (
    BACKEND_ENV,
    add_lora,
    lora_expand,
    lora_shrink,
    select_backend,
    triton_available,
)
from loragate.kernels.lora_ref import add_lora_ref, lora_expand_ref, lora_shrink_ref

__all__ = [
    "BACKEND_ENV",
    "LoraBatchLayout",
    "Segment",
    "add_lora",
    "add_lora_ref",
    "lora_expand",
    "lora_expand_ref",
    "lora_shrink",
    "lora_shrink_ref",
    "select_backend",
    "triton_available",
]
