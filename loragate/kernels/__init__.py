"""Batched multi-adapter LoRA ops: pure functions on tensors (imports nothing from engine/gateway).

`add_lora` is what the model calls per projection group; `lora_shrink`/`lora_expand` are its two
halves. Each dispatches to Triton (CUDA) or the torch reference (CPU); see `lora.py`.
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
