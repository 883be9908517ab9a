"""Applying a packed token bitmask to the step's logits (the constrained rows only).

On the CPU the int32 words are unpacked with numpy's `unpackbits` (one C pass: ~1.5 MB of bools
for 32 rows of a 49k vocabulary); elsewhere the bitmask moves to the device and is expanded with
shifts there. Both give `allowed[r, t] = bit t % 32 of word t // 32`, tested against each other.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

_NEG_INF = float("-inf")


def unpack_numpy(bitmask: torch.Tensor, width: int) -> torch.Tensor:
    """The CPU path (little-endian hosts: byte 0 of a word holds its bits 0-7)."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :width]
    return torch.from_numpy(bits).to(torch.bool)


def unpack_torch(bitmask: torch.Tensor, width: int, device: torch.device) -> torch.Tensor:
    """The device path: the packed words move (4 bytes per 32 tokens) and expand there."""
    shifts = torch.arange(32, dtype=torch.int32, device=device)
    words = bitmask.to(device, non_blocking=True)
    return ((words.unsqueeze(-1) >> shifts) & 1).to(torch.bool).flatten(1)[:, :width]


def unpack_bitmask(bitmask: torch.Tensor, vocab: int, device: torch.device) -> torch.Tensor:
    """bool [rows, vocab] from int32 words [rows, words]; columns past 32 * words are False."""
    rows, words = bitmask.shape
    width = min(vocab, 32 * words)
    if device.type == "cpu" and sys.byteorder == "little":
        allowed = unpack_numpy(bitmask, width)
    else:
        allowed = unpack_torch(bitmask, width, device)
    if width < vocab:
        allowed = torch.cat([allowed, allowed.new_zeros(rows, vocab - width)], dim=1)
    return allowed


@dataclass
class TokenBitmask:
    """Which tokens each constrained row may take next: `rows` index the sampler's batch and
    `bitmask[i]` belongs to `rows[i]`."""

    rows: list[int]
    bitmask: torch.Tensor  # int32 [len(rows), words], CPU

    def apply(self, logits: torch.Tensor) -> None:
        """Set disallowed tokens of the constrained rows to -inf, in place on float logits [B, V]."""
        allowed = unpack_bitmask(self.bitmask, logits.shape[-1], logits.device)
        if len(self.rows) == logits.shape[0] and self.rows == list(range(len(self.rows))):
            logits.masked_fill_(~allowed, _NEG_INF)
            return
        idx = torch.tensor(self.rows, dtype=torch.long).to(logits.device)
        logits[idx] = logits[idx].masked_fill_(~allowed, _NEG_INF)
