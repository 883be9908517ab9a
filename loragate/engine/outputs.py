"""The engine's request and output types: the whole vocabulary the gateway and engine share."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from loragate.engine.sampling_params import SamplingParams


@dataclass
class EngineRequest:
    """One generation request as the engine sees it: token ids in, an adapter name, a tenant."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None = None  # None = base model
    tenant: str | None = None  # fairness is counted per tenant when set, else per adapter
    arrival_time: float = field(default_factory=time.monotonic)


@dataclass
class TokenLogprob:
    """Logprob of one generated token and its top alternatives (token id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """An increment of one request's output, emitted after each step that produced tokens."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | error
    new_logprobs: list[TokenLogprob] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    # timing, filled on the engine side (monotonic seconds) for metrics
    queue_time: float | None = None
    first_token_time: float | None = None
    # with finish_reason "error", what the client did wrong: "adapter_load" (its adapter is bad),
    # "adapter_not_found" (deleted before the request reached the engine); None = a server fault
    error_kind: str | None = None
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (whole blocks)
    # structured outputs: the grammar was complete when the request finished (its answer, not a stop
    # string, ended it; LoRAX reports that as `eos_token`, the end its constrained decoding emits)
    grammar_complete: bool = False
    # with params.prompt_logprobs: one entry per prompt token (the first None: nothing predicts it),
    # on the first output after the prompt is fully prefilled, and on no other
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class EngineStats:
    """Counters the gateway exports as metrics and tests use to check nothing leaked."""

    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    steps: int
    alive: bool
    preemptions: int = 0
    lora_slots: int = 0  # adapter slots on the device (--max-loras, or what `auto` sized)
    prefix_cache_queries: int = 0  # prompt tokens of admitted requests looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found cached (not prefilled again)
    prefix_cache_blocks: int = 0  # KV blocks holding cached computed content (in use or reclaimable)


@dataclass
class AdapterStats:
    """One adapter's state in the tiered cache."""

    name: str
    path: str
    tier: str  # device | cpu | disk | loading | failed
    size_bytes: int
    rank: int | None
    requests_served: int
    load_count: int
    last_load_seconds: float | None
    pinned: bool = False
    error: str | None = None


@dataclass(frozen=True)
class LoraState:
    """Where the adapters stand right now, as routers in front of the server want to know it
    (vLLM's `vllm:lora_requests_info`): which adapters sit in device slots ready to run, which ones
    queued requests are waiting for (requested but not resident), and how many slots there are."""

    running: tuple[str, ...]
    waiting: tuple[str, ...]
    max_loras: int
