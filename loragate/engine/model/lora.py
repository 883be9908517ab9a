"""Device-resident LoRA slots: the stacked A and B buffers every LoRA-capable projection reads.

Projections that share an input are fused in the model (q|k|v and gate|up), so LoRA weights are
kept per *group*: A is [slots, n_slices, max_rank, in_dim] and B is [slots, sum(out_dims), max_rank]
with each slice's rows at its column offset in the fused output. A slot whose adapter does not
target a module keeps zeros there; its rank and scale are per slot. The adapter cache writes slots
(`write_slot`), the model only reads them through the kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# PEFT module name -> (group, slice index within the group)
MODULE_TO_GROUP: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv", 0),
    "k_proj": ("qkv", 1),
    "v_proj": ("qkv", 2),
    "o_proj": ("o", 0),
    "gate_proj": ("gate_up", 0),
    "up_proj": ("gate_up", 1),
    "down_proj": ("down", 0),
}
GROUPS = ("qkv", "o", "gate_up", "down")


@dataclass(frozen=True)
class LoraGroupSpec:
    """Shape of one fused projection group: its input width and each slice's output width."""

    name: str
    in_dim: int
    slice_names: tuple[str, ...]
    slice_out: tuple[int, ...]

    @property
    def slice_offsets(self) -> tuple[int, ...]:
        offs = [0]
        for n in self.slice_out:
            offs.append(offs[-1] + n)
        return tuple(offs)

    @property
    def out_dim(self) -> int:
        return sum(self.slice_out)


def group_specs(hidden: int, q_out: int, kv_out: int, intermediate: int) -> dict[str, LoraGroupSpec]:
    """The four groups of a Llama-family decoder layer."""
    return {
        "qkv": LoraGroupSpec("qkv", hidden, ("q_proj", "k_proj", "v_proj"), (q_out, kv_out, kv_out)),
        "o": LoraGroupSpec("o", q_out, ("o_proj",), (hidden,)),
        "gate_up": LoraGroupSpec("gate_up", hidden, ("gate_proj", "up_proj"), (intermediate, intermediate)),
        "down": LoraGroupSpec("down", intermediate, ("down_proj",), (hidden,)),
    }


class LoraWeights:
    """Fixed-size stacked buffers for `max_loras` adapters, allocated once at start-up."""

    def __init__(
        self,
        specs: dict[str, LoraGroupSpec],
        num_layers: int,
        max_loras: int,
        max_rank: int,
        device: torch.device,
        dtype: torch.dtype,
        groups: tuple[str, ...] | None = None,
    ) -> None:
        """`groups`: the only groups to allocate (the targets the slots were sized for, see
        adapters/slots.py); adapters targeting others are refused when they load."""
        if groups is not None:
            specs = {g: s for g, s in specs.items() if g in groups}
        self.specs = specs
        self.num_layers = num_layers
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.device = device
        self.dtype = dtype
        self.A: list[dict[str, torch.Tensor]] = []
        self.B: list[dict[str, torch.Tensor]] = []
        for _ in range(num_layers):
            self.A.append({
                g: torch.zeros(max_loras, len(s.slice_out), max_rank, s.in_dim, device=device, dtype=dtype)
                for g, s in specs.items()
            })
            self.B.append({g: self._b_buffer(max_loras, s.out_dim, max_rank) for g, s in specs.items()})
        self.slot_ranks: list[int] = [0] * max_loras
        self.slot_scales: list[float] = [0.0] * max_loras
        # (group, slice index) pairs each slot's adapter targets: a step skips the groups no
        # adapter in it targets, and the CPU path also the slices (k of q|k|v for q/v adapters)
        self.slot_slices: list[frozenset[tuple[str, int]]] = [frozenset()] * max_loras
        # what each slot's buffers hold beyond zeros (groups, rank): invariant is that everything
        # outside it is zero, so replacing an adapter zeroes only its predecessor's rows instead of
        # the whole slot (~40 MB per slot on a 135M model at max rank 64)
        self._footprint: list[tuple[frozenset[str], int]] = [(frozenset(), 0)] * max_loras

    def _b_buffer(self, max_loras: int, out_dim: int, max_rank: int) -> torch.Tensor:
        """[max_loras, out_dim, max_rank]. On the CPU a view of a rank-major buffer: the native
        kernel adds an adapter's B to the outputs one rank row (a contiguous vector) at a time
        (loragate.kernels.lora_cpu). The Triton kernels read the plain layout."""
        if self.device.type == "cpu":
            return torch.zeros(max_loras, max_rank, out_dim, dtype=self.dtype).transpose(1, 2)
        return torch.zeros(max_loras, out_dim, max_rank, device=self.device, dtype=self.dtype)

    def nbytes_per_slot(self) -> int:
        per = sum(t[0].numel() for t in self.A[0].values()) + sum(t[0].numel() for t in self.B[0].values())
        return per * self.num_layers * torch.finfo(self.dtype).bits // 8

    def write_slot(
        self,
        slot: int,
        weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
        rank: int,
        scale: float,
    ) -> None:
        """Fill `slot` from {(layer, peft_module_name): (A [r, in], B [out, r])}. Modules absent from
        `weights` are zeroed. A module's own rank may be below `rank` (rank_pattern); the rest of
        its rows stay zero. Call only while no running request uses `slot`."""
        if rank > self.max_rank:
            raise ValueError(f"rank {rank} exceeds max_lora_rank {self.max_rank}")
        self.slot_ranks[slot] = 0  # unusable while being written
        old_groups, old_rank = self._footprint[slot]
        for layer in range(self.num_layers):
            for g in old_groups:
                self.A[layer][g][slot, :, :old_rank].zero_()
                self.B[layer][g][slot, :, :old_rank].zero_()
        for (layer, module), (a, b) in weights.items():
            group, idx = MODULE_TO_GROUP[module]
            spec = self.specs[group]
            r = a.shape[0]
            off = spec.slice_offsets[idx]
            self.A[layer][group][slot, idx, :r].copy_(a, non_blocking=True)
            self.B[layer][group][slot, off : off + spec.slice_out[idx], :r].copy_(b, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        groups = frozenset(MODULE_TO_GROUP[m][0] for (_, m) in weights)
        self._footprint[slot] = (groups, max((a.shape[0] for a, _ in weights.values()), default=0))
        self.slot_slices[slot] = frozenset(MODULE_TO_GROUP[m] for (_, m) in weights)
        self.slot_scales[slot] = float(scale)
        self.slot_ranks[slot] = int(rank)

    def clear_slot(self, slot: int) -> None:
        self.slot_ranks[slot] = 0
        self.slot_slices[slot] = frozenset()
        self.slot_scales[slot] = 0.0
