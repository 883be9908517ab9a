"""Applying a packed token bitmask to the step's logits (the constrained rows only).

The mask is inverted while still packed (4 bytes per 32 tokens), so unpacking yields the blocked
tokens directly. On the CPU the words are unpacked with numpy's `unpackbits` (one C pass) and the
resulting 0/1 bytes are viewed as torch bools without a copy; elsewhere the packed words move to the
device and are expanded with shifts there. Both give `bit t % 32 of word t // 32` for token t,
tested against each other and a per-bit loop.
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
    return torch.from_numpy(bits).view(torch.bool)  # the bytes are 0 or 1: valid bools as they are


def unpack_torch(bitmask: torch.Tensor, width: int, device: torch.device) -> torch.Tensor:
    """The device path: the packed words move (4 bytes per 32 tokens) and expand there."""
    shifts = torch.arange(32, dtype=torch.int32, device=device)
    words = bitmask.to(device, non_blocking=True)
    return ((words.unsqueeze(-1) >> shifts) & 1).to(torch.bool).flatten(1)[:, :width]


def _unpack(bitmask: torch.Tensor, vocab: int, device: torch.device, beyond: bool) -> torch.Tensor:
    rows, words = bitmask.shape
    width = min(vocab, 32 * words)
    if device.type == "cpu" and sys.byteorder == "little":
        bits = unpack_numpy(bitmask, width)
    else:
        bits = unpack_torch(bitmask, width, device)
    if width < vocab:
        bits = torch.cat([bits, torch.full((rows, vocab - width), beyond, dtype=torch.bool, device=bits.device)], 1)
    return bits


def unpack_bitmask(bitmask: torch.Tensor, vocab: int, device: torch.device) -> torch.Tensor:
    """Allowed tokens, bool [rows, vocab], from int32 words [rows, words]; columns past
    32 * words are not allowed."""
    return _unpack(bitmask, vocab, device, beyond=False)


def blocked_tokens(bitmask: torch.Tensor, vocab: int, device: torch.device) -> torch.Tensor:
    """The complement of `unpack_bitmask`, computed without a pass over the unpacked matrix."""
    return _unpack(torch.bitwise_not(bitmask), vocab, device, beyond=True)


@dataclass
class TokenBitmask:
    """Which tokens each constrained row may take next: `rows` index the sampler's batch and
    `bitmask[i]` belongs to `rows[i]`."""

    rows: list[int]
    bitmask: torch.Tensor  # int32 [len(rows), words], CPU

    def apply(self, logits: torch.Tensor) -> None:
        """Set disallowed tokens of the constrained rows to -inf, in place on float logits [B, V]."""
        blocked = blocked_tokens(self.bitmask, logits.shape[-1], logits.device)
        if len(self.rows) == logits.shape[0] and self.rows == list(range(len(self.rows))):
            logits.masked_fill_(blocked, _NEG_INF)
            return
        idx = torch.tensor(self.rows, dtype=torch.long).to(logits.device)
        logits[idx] = logits[idx].masked_fill_(blocked, _NEG_INF)
