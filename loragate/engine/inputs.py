"""Turn the scheduler's decision into the model's tensors: one flat batch per step.

Built on the host with a handful of vectorised tensor ops (block tables are padded into one
tensor), then moved to the device in one go, so input preparation stays a small fraction of a
decode step even at large batch sizes.
"""
from __future__ import annotations

import torch

from loragate.engine.kv_cache import KVCache
from loragate.engine.model.attention import AttentionMetadata, PrefillChunk
from loragate.engine.model.llama import ForwardBatch
from loragate.engine.model.lora import LoraWeights
from loragate.engine.scheduler import ScheduledSeq
from loragate.kernels.layout import LoraBatchLayout


def _slots(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slots of `positions` through a block table ([blocks], or [B, blocks] for a batch)."""
    return block_table[..., positions // block_size] * block_size + positions % block_size


def build_forward_batch(scheduled: list[ScheduledSeq], block_size: int, device: torch.device,
                        lora: LoraWeights | None) -> ForwardBatch:
    ids: list[int] = []
    positions: list[int] = []
    slot_map: list[int] = []
    token_slots: list[int] = []
    logits_rows: list[int] = []
    decode_rows: list[int] = []
    decode_tables: list[list[int]] = []
    decode_lens: list[int] = []
    prefills: list[PrefillChunk] = []
    row = 0
    for s in scheduled:
        seq, n, start = s.seq, s.num_tokens, s.seq.num_computed
        table = seq.block_table
        ids.extend(seq.token_slice(start, start + n))
        positions.extend(range(start, start + n))
        # plain ints: a step is mostly one-token decodes, where tensor ops per sequence cost more
        slot_map.extend(KVCache.slot(table, p, block_size) for p in range(start, start + n))
        token_slots.extend([seq.slot] * n)
        if n == 1 and start > 0:
            decode_rows.append(row)
            decode_tables.append(table)
            decode_lens.append(start + 1)
        else:
            ctx = start + n
            kv_index = (_slots(torch.tensor(table, dtype=torch.long), torch.arange(ctx), block_size)
                        if start > 0 else torch.empty(0, dtype=torch.long))
            prefills.append(PrefillChunk(row, row + n, kv_index.to(device), fresh=start == 0))
        if s.sample:
            logits_rows.append(row + n - 1)
        row += n
    meta = AttentionMetadata(slot_mapping=torch.tensor(slot_map, dtype=torch.long).to(device), prefills=prefills)
    if decode_rows:
        max_blocks = max(len(t) for t in decode_tables)
        tables = torch.zeros(len(decode_tables), max_blocks, dtype=torch.long)
        for i, t in enumerate(decode_tables):
            tables[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        # padded to whole blocks: the attention matmuls' shapes then change once every block_size
        # steps, not every step (oneDNN builds a kernel per new shape, ~1 ms each on the CPU)
        max_len = -(-max(decode_lens) // block_size) * block_size
        offs = torch.arange(max_len)
        kv_index = _slots(tables, offs, block_size)
        lens = torch.tensor(decode_lens)
        mask = (offs.unsqueeze(0) < lens.unsqueeze(1)).view(len(decode_lens), 1, 1, max_len)
        meta.decode_rows = torch.tensor(decode_rows, dtype=torch.long).to(device)
        meta.decode_kv_index = kv_index.to(device)
        meta.decode_mask = mask.to(device)
        meta.decode_lens = lens.to(device)
    layout = None
    if lora is not None and any(s >= 0 for s in token_slots):
        layout = LoraBatchLayout.from_token_slots(token_slots, lora.slot_ranks, lora.slot_scales, device)
    return ForwardBatch(
        input_ids=torch.tensor(ids, dtype=torch.long).to(device),
        positions=torch.tensor(positions, dtype=torch.long).to(device),
        attn=meta,
        logits_rows=torch.tensor(logits_rows, dtype=torch.long).to(device),
        lora=layout,
    )
