"""Prompt-token logprobs (vLLM's `prompt_logprobs`, LoRAX's `decoder_input_details`).

Prompt token i (i >= 1) gets log_softmax(logits at position i - 1)[prompt[i]]; token 0 has none
(nothing predicts it). A step normally computes logits only for the rows it samples from; for a
sequence that asks for prompt logprobs it also computes them for the prompt positions of its
prefill chunk whose next token is a prompt token, appended after the sampled rows, so requests that
do not ask cost nothing. Entries accumulate on the sequence across the chunks of a chunked prefill
and across a preemption's recompute (positions already gathered are not gathered again), and are
delivered once, on the first output after the prompt is fully prefilled.

Such a request needs the logits of every prompt position, so it takes no prefix-cache hits until
its entries are complete (the scheduler asks `skip_prefix_cache`); its own blocks are still cached
for others. Logprobs are the model's raw distribution in float32: no penalty, bias or temperature.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from loragate.engine.outputs import TokenLogprob

if TYPE_CHECKING:
    from loragate.engine.scheduler import ScheduledSeq
    from loragate.engine.sequence import Sequence

ROWS_PER_SOFTMAX = 256  # float32 [rows, vocab] at a time: a 2k-token chunk never widens at once


@dataclass
class PromptLogprobState:
    """One sequence's prompt logprobs so far: entries for prompt tokens 1..len(entries)."""

    top: int  # alternatives per entry (0 = only the prompt token's own)
    entries: list[TokenLogprob] = field(default_factory=list)
    delivered: bool = False


@dataclass
class PromptRows:
    """This step's extra logits rows for one sequence: prompt positions [first, first + count)."""

    seq: "Sequence"
    first: int
    count: int


def wants(seq: "Sequence") -> bool:
    """Still gathering: the sequence asked and not every prompt token has its entry yet."""
    st = seq.prompt_lp
    return st is not None and len(st.entries) < len(seq.prompt_ids) - 1


def skip_prefix_cache(seq: "Sequence") -> bool:
    return wants(seq)


def plan(scheduled: list["ScheduledSeq"]) -> tuple[list[int], list[PromptRows]]:
    """Batch rows (in `build_forward_batch`'s flat order) whose logits the prompt logprobs need,
    and which sequence and positions they are."""
    rows: list[int] = []
    spans: list[PromptRows] = []
    row = 0
    for s in scheduled:
        seq, start, n = s.seq, s.seq.num_computed, s.num_tokens
        if wants(seq):
            lo = max(start, len(seq.prompt_lp.entries))  # position p predicts prompt token p + 1
            hi = min(start + n, len(seq.prompt_ids) - 1)
            if hi > lo:
                rows.extend(range(row + lo - start, row + hi - start))
                spans.append(PromptRows(seq, lo, hi - lo))
        row += n
    return rows, spans


def gather(logits: torch.Tensor, spans: list[PromptRows]) -> None:
    """Append each span's entries from its logits rows (in plan order)."""
    at = 0
    for span in spans:
        st = span.seq.prompt_lp
        ids = span.seq.prompt_ids
        for lo in range(0, span.count, ROWS_PER_SOFTMAX):
            hi = min(lo + ROWS_PER_SOFTMAX, span.count)
            lps = torch.log_softmax(logits[at + lo: at + hi].float(), dim=-1)
            target = torch.tensor(ids[span.first + lo + 1: span.first + hi + 1], device=lps.device)
            chosen = lps.gather(1, target.unsqueeze(1)).squeeze(1).tolist()
            if st.top > 0:
                vals, idx = lps.topk(min(st.top, lps.shape[-1]), dim=-1)
                tops = [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
            else:
                tops = [[] for _ in chosen]
            st.entries.extend(TokenLogprob(t, lp, top) for t, lp, top in zip(target.tolist(), chosen, tops))
        at += span.count


def take(seq: "Sequence") -> list[TokenLogprob | None] | None:
    """The full list (first entry None) the first time it is complete, else None."""
    st = seq.prompt_lp
    if st is None or st.delivered or wants(seq):
        return None
    st.delivered = True
    return [None, *st.entries]
