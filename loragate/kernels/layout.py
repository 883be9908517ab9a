"""The batch's adapter layout: computed once per step, handed to every LoRA layer.

The engine orders the sequences of a step so that the tokens of each adapter are contiguous in the
flat batch. A *segment* is one such run: (start, length, slot, rank, scale). Tokens that belong to
no segment are base-model tokens and every LoRA op skips them. Building this once per step means no
layer sorts, searches or synchronises with the host on its own (the Punica/SGMV idea).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Segment:
    """A run of consecutive tokens that use the same adapter slot."""

    start: int
    length: int
    slot: int
    rank: int
    scale: float


@dataclass
class LoraBatchLayout:
    """Segment table of one step, both as host data (torch path) and device tensors (Triton path)."""

    num_tokens: int
    segments: list[Segment]
    seg_starts: torch.Tensor  # int32 [S]
    seg_lens: torch.Tensor  # int32 [S]
    seg_slots: torch.Tensor  # int32 [S]
    seg_ranks: torch.Tensor  # int32 [S]
    seg_scales: torch.Tensor  # float32 [S]
    max_seg_len: int
    max_rank: int
    # per-step memo of derived index tensors (e.g. the torch path's gather plan): built at most
    # once per step however many layers use the layout
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def empty(self) -> bool:
        """True when no token of the step uses an adapter: LoRA layers can return at once."""
        return not self.segments

    @classmethod
    def from_token_slots(
        cls,
        token_slots: list[int],
        slot_ranks: list[int] | torch.Tensor,
        slot_scales: list[float] | torch.Tensor,
        device: torch.device | str = "cpu",
    ) -> "LoraBatchLayout":
        """Build the table from each token's slot (-1 = base model). Runs of equal slots become
        segments; a slot may appear in several runs (the kernels do not need them merged)."""
        ranks = [int(r) for r in (slot_ranks.tolist() if torch.is_tensor(slot_ranks) else slot_ranks)]
        scales = [float(s) for s in (slot_scales.tolist() if torch.is_tensor(slot_scales) else slot_scales)]
        segments: list[Segment] = []
        i, n = 0, len(token_slots)
        while i < n:
            slot = token_slots[i]
            j = i + 1
            while j < n and token_slots[j] == slot:
                j += 1
            if slot >= 0 and ranks[slot] > 0:
                segments.append(Segment(i, j - i, slot, ranks[slot], scales[slot]))
            i = j
        return cls.from_segments(n, segments, device)

    @classmethod
    def from_segments(
        cls, num_tokens: int, segments: list[Segment], device: torch.device | str = "cpu"
    ) -> "LoraBatchLayout":
        def t(values, dtype):
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        return cls(
            num_tokens=num_tokens,
            segments=segments,
            seg_starts=t([s.start for s in segments], torch.int32),
            seg_lens=t([s.length for s in segments], torch.int32),
            seg_slots=t([s.slot for s in segments], torch.int32),
            seg_ranks=t([s.rank for s in segments], torch.int32),
            seg_scales=t([s.scale for s in segments], torch.float32),
            max_seg_len=max((s.length for s in segments), default=0),
            max_rank=max((s.rank for s in segments), default=0),
        )
