"""A request inside the engine: token state, KV blocks and an explicit lifecycle.

State machine (nano-vllm / vLLM v1 style): WAITING -> RUNNING -> FINISHED, with RUNNING ->
WAITING on preemption (blocks freed; the prompt and tokens generated so far are recomputed on
re-admission, so nothing already streamed is lost or repeated).
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from loragate.engine.detokenizer import TextStream
from loragate.engine.outputs import EngineRequest
from loragate.engine.prefix_cache import PrefixState
from loragate.engine.prompt_logprobs import PromptLogprobState

if TYPE_CHECKING:
    from loragate.engine.structured.runtime import SequenceGrammar


class SeqState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request: EngineRequest
    client: str  # fairness key: tenant, else adapter, else "base"
    text: TextStream
    generator: torch.Generator | None = None
    state: SeqState = SeqState.WAITING
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose k/v are in the cache
    prompt_charged: int = 0  # prompt tokens already charged to the client's fairness counter
    slot: int = -1  # adapter device slot while RUNNING, -1 for base
    finish_reason: str | None = None
    admitted_at: float | None = None
    first_token_at: float | None = None
    preemptions: int = 0
    grammar: SequenceGrammar | None = None  # set when the request is constrained (structured outputs)
    prefix: PrefixState = field(default_factory=PrefixState)  # its place in the prefix cache
    num_cached_tokens: int = 0  # prompt tokens the first admission found cached (usage reports them)
    prompt_lp: PromptLogprobState | None = None  # set when the request asks for prompt logprobs

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_token_ids) + len(self.output_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """Token ids [start, end) of prompt then output, as one list: hashing a block and building a
        chunk's inputs take whole runs (per-token calls were ~2% of a burst step of 32 prompts)."""
        p = self.request.prompt_token_ids
        if end <= len(p):
            return p[start:end]
        return [*p[start:], *self.output_ids[max(start - len(p), 0):end - len(p)]]

    @property
    def waited(self) -> float:
        return (self.admitted_at or time.monotonic()) - self.request.arrival_time
