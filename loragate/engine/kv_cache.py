"""Paged KV cache: fixed-size blocks, a free list, and per-sequence block tables.

Memory is sized once at start-up from an explicit byte budget (or a fraction of free device
memory) and never grows: a request that does not fit waits or preempts another, it never makes
the server allocate more. Each layer's keys and values live together in one head-major
[2 * kv_heads, slots, head_dim] tensor, keys in the first kv_heads rows and values in the rest;
slot = block * block_size + offset. Head-major lets one index_select gather a batch's pages
directly into the [batch * kv_heads, context, head_dim] operands of decode attention's batched
matmuls, and keeping keys and values in one tensor makes a layer's cache write one index_copy
and its decode gather one index_select (see model/attention.py).

The blocks themselves (refcounts, the free list, and the prefix cache that lets sequences share
computed blocks) are `prefix_cache.PrefixCache`, this cache's `allocator`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loragate.engine.prefix_cache import PrefixCache


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    def bytes_per_block(self) -> int:
        elem = torch.finfo(self.dtype).bits // 8
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def blocks_for_budget(self, nbytes: int) -> int:
        return max(0, nbytes // self.bytes_per_block())


def context_rows(kv_index: torch.Tensor, num_kv_heads: int, num_slots: int) -> torch.Tensor:
    """Rows of a layer's cache viewed flat as [2 * kv_heads * slots, head_dim] that hold the keys,
    then the values, of the contexts whose slots `kv_index` [B, L] names, in (sequence, KV head,
    position) order: one dim-0 index_select of them (the fast row-copy path, measured ~2x the speed
    of index_select along the slot dim) is the [B * kv_heads, L, head_dim] key and value operands of
    batched attention matmuls as they are."""
    B = kv_index.shape[0]
    heads = torch.arange(num_kv_heads, device=kv_index.device).view(1, num_kv_heads, 1) * num_slots
    keys = (kv_index.view(B, 1, -1) + heads).reshape(-1)
    return torch.cat([keys, keys + num_kv_heads * num_slots])


class KVCache:
    """The cache tensors of every layer plus the allocator of their blocks."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device,
                 prefix_caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError("KV cache budget too small for even one block")
        self.spec = spec
        self.block_size = spec.block_size
        self.allocator = PrefixCache(num_blocks, spec.block_size, enabled=prefix_caching)
        slots = num_blocks * spec.block_size
        shape = (2 * spec.num_kv_heads, slots, spec.head_dim)
        self.layers: list[torch.Tensor] = [torch.zeros(shape, dtype=spec.dtype, device=device)
                                           for _ in range(spec.num_layers)]

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @staticmethod
    def slot(block_table: list[int], position: int, block_size: int) -> int:
        return block_table[position // block_size] * block_size + position % block_size


def kv_budget_bytes(explicit: int | None, device: torch.device, fraction: float, cpu_default: int,
                    free: int | None = None, reserved: int = 0) -> int:
    """Bytes the KV cache may take: explicit wins; CUDA takes a fraction of the memory `free`
    after the weights (measured now when not given), less the `reserved` bytes the adapter slots
    took out of that same budget."""
    if explicit is not None:
        return explicit
    if device.type == "cuda":
        if free is None:
            free, _total = torch.cuda.mem_get_info(device)
        return max(0, int(free * fraction) - reserved)
    return cpu_default
