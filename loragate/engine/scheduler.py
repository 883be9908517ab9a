"""Continuous batching: which sequences run this step, and how many of their tokens.

Each step has a token budget (`max_num_batched_tokens`) and a sequence cap (`max_num_seqs`).
Running sequences go first (one decode token each, or the next chunk of a long prompt); the rest
of the budget admits waiting requests. Whom to admit is the fairness policy's call (VTC by
default), among clients whose next request is admissible now: its adapter is resident in a device
slot (loads happen on the adapter cache's own thread, so the step never waits for one) and its
first chunk's KV blocks are free. When blocks run out, the most recently admitted sequence is
preempted (its blocks freed, recomputed later): no request is ever dropped.

With prefix caching (prefix_cache.py) a request starts from the longest run of computed blocks
cached for its adapter's content and its leading tokens: only the rest is scheduled, and only that
is charged to its client. A head whose next block another running sequence is computing this very
step waits a step to share it (n > 1 choices, bursts of one system prompt). A preempted sequence
finds its own blocks again if they were not reclaimed meanwhile.

The scheduler decides; the engine executes (vLLM v1's split).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loragate.engine.config import EngineConfig
from loragate.engine.kv_cache import KVCache
from loragate.engine.prefix_cache import BASE_IDENTITY, Match, adapter_identity
from loragate.engine.prompt_logprobs import skip_prefix_cache
from loragate.engine.sequence import Sequence, SeqState

if TYPE_CHECKING:
    from loragate.engine.adapters.cache import AdapterCache
    from loragate.engine.fairness import FairnessPolicy


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens computed this step, starting at seq.num_computed
    sample: bool  # this chunk reaches the end of the sequence: sample its next token


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)  # ordered by adapter slot
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[tuple[Sequence, str]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    """Per-client FIFO queues + a running list, over a bounded KV cache."""

    def __init__(self, config: EngineConfig, kv: KVCache, policy: "FairnessPolicy",
                 adapters: "AdapterCache | None") -> None:
        self.config = config
        self.kv = kv
        self.policy = policy
        self.adapters = adapters
        self.queues: dict[str, deque[Sequence]] = {}
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ---- bookkeeping ----------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def has_work(self) -> bool:
        return bool(self.running) or self.num_waiting > 0

    def backlogged(self) -> list[str]:
        return [c for c, q in self.queues.items() if q]

    def add(self, seq: Sequence, front: bool = False) -> None:
        queue = self.queues.setdefault(seq.client, deque())
        if not queue:
            self.policy.on_enqueue(seq.client, self.backlogged())
        if front:
            queue.appendleft(seq)
        else:
            queue.append(seq)
        if seq.request.adapter and self.adapters is not None:
            self.adapters.request(seq.request.adapter)

    def remove(self, seq: Sequence) -> None:
        """Take `seq` out of whatever list holds it and give back its blocks and slot."""
        if seq.state is SeqState.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        elif seq.state is SeqState.WAITING:
            queue = self.queues.get(seq.client)
            if queue is not None and seq in queue:
                queue.remove(seq)
        seq.state = SeqState.FINISHED

    def _release(self, seq: Sequence) -> None:
        self.kv.allocator.release(seq)  # frees its blocks; cached ones stay for others
        if seq.request.adapter and self.adapters is not None and seq.slot >= 0:
            self.adapters.release(seq.request.adapter)
        seq.slot = -1

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.state = SeqState.WAITING
        seq.preemptions += 1
        self.num_preemptions += 1
        self.add(seq, front=True)

    def _grow(self, seq: Sequence, upto: int) -> bool:
        """Make sure seq has blocks for positions [0, upto)."""
        need = self.kv.blocks_needed(upto) - len(seq.block_table)
        if need <= 0:
            return True
        if not self.kv.allocator.can_allocate(need):
            return False
        seq.block_table.extend(self.kv.allocator.allocate(need))
        return True

    # ---- prefix caching ---------------------------------------------------------------------
    def _identity(self, seq: Sequence) -> bytes | None:
        """Whose KV seq's blocks hold: the base model's, or its adapter's content as now resident
        (None: not cacheable, e.g. an adapter built without a digest)."""
        if not self.kv.allocator.enabled:
            return None
        name = seq.request.adapter
        if not name or self.adapters is None:
            return BASE_IDENTITY
        digest = self.adapters.digest_of(name)
        return adapter_identity(digest) if digest else None

    def _match(self, seq: Sequence) -> tuple[bytes | None, Match]:
        identity = self._identity(seq)
        if skip_prefix_cache(seq):  # needs every prompt position's logits: computes all, still caches
            return identity, Match([])
        return identity, self.kv.allocator.match(seq, identity)

    # ---- the decision -----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        # 1. running sequences, oldest first; preempt the newest when blocks run out
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self._grow(seq, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.state is not SeqState.RUNNING:
                break  # seq preempted itself: everything after it is gone too
            self._add_scheduled(out, seq, n)
            budget -= n
            i += 1
        # 2. admission, fair across clients, only if nobody had to be preempted
        if not out.preempted:
            self._admit(out, budget)
        # drop the queues of clients with nothing waiting, so that the per-step scans of the queues
        # cost what the backlog is, not how many clients (adapters, tenants) were ever seen
        self.queues = {c: q for c, q in self.queues.items() if q}
        out.scheduled.sort(key=lambda s: s.seq.slot)
        return out

    def _add_scheduled(self, out: SchedulerOutput, seq: Sequence, n: int) -> None:
        """Schedule n tokens of seq and charge its client for new prompt tokens at once, so the
        next pick of this same step already sees the updated counters (VTC's bound needs that).
        A prompt recomputed after preemption is charged only once."""
        out.scheduled.append(ScheduledSeq(seq, n, seq.num_computed + n == seq.num_tokens))
        fresh = min(seq.num_computed + n, len(seq.prompt_ids)) - seq.prompt_charged
        if fresh > 0:
            seq.prompt_charged += fresh
            self.policy.charge(seq.client, prompt_tokens=fresh)

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        while budget > 0 and len(self.running) < self.config.max_num_seqs:
            candidates = []
            for client, queue in self.queues.items():
                if not queue:
                    continue
                head = queue[0]
                if self._adapter_slot(head, out) is None:
                    continue
                if not self._grammar_ready(head, out):
                    continue
                if self._match(head)[1].pending:
                    continue  # its next block is being computed by a running sequence: share it
                candidates.append((client, head.request.arrival_time))
            if not candidates:
                return
            client = self.policy.pick(candidates)
            seq = self.queues[client][0]
            identity, match = self._match(seq)
            start = len(match.blocks) * self.kv.block_size  # cached tokens, whole blocks
            n = min(seq.num_tokens - start, budget)
            need = self.kv.blocks_needed(start + n) - len(match.blocks)
            if not self.kv.allocator.can_start(match, need):
                return  # no memory for the fairest choice: wait rather than skip past it
            slot = -1
            if seq.request.adapter and self.adapters is not None:
                slot = self.adapters.acquire(seq.request.adapter)
                if identity is not None and self._identity(seq) != identity:
                    self.adapters.release(seq.request.adapter)  # reloaded with other content meanwhile
                    return
            self.queues[client].popleft()
            self._start(seq, identity, match, start + n)
            seq.slot = slot
            seq.state = SeqState.RUNNING
            if seq.admitted_at is None:
                seq.admitted_at = time.monotonic()
            self.running.append(seq)
            self._add_scheduled(out, seq, n)
            budget -= n

    def _grammar_ready(self, head: Sequence, out: SchedulerOutput) -> bool:
        """A constrained head runs only once its grammar compiled (on the compiler's thread) and
        its matcher agrees with the tokens it kept; one whose grammar failed is failed here."""
        g = head.grammar
        if g is None or g.ready(head.output_ids):
            return True
        if g.error is not None:
            self.queues[head.client].popleft()
            head.state = SeqState.FINISHED
            out.failed.append((head, f"invalid grammar: {g.error}"))
        return False

    def _start(self, seq: Sequence, identity: bytes | None, match: Match, upto: int) -> None:
        """Give an admitted seq its matched blocks, then blocks up to position `upto` (the caller
        checked that both fit). The first admission records what the prompt found cached; cached
        tokens are never charged to the client."""
        pool = self.kv.allocator
        pool.start(seq, identity, match)
        if not self._grow(seq, upto):
            raise RuntimeError("KV blocks checked free were not")
        if seq.admitted_at is None:
            cached = min(seq.num_computed, len(seq.prompt_ids))
            seq.num_cached_tokens = cached
            seq.prompt_charged = max(seq.prompt_charged, cached)
            if identity is not None:
                pool.queries += len(seq.prompt_ids)
                pool.hits += cached

    def _adapter_slot(self, head: Sequence, out: SchedulerOutput) -> int | None:
        """The head's device slot (-1 for base), or None if it cannot run yet. Heads whose adapter
        failed to load are failed here, so one broken adapter never blocks its client's queue."""
        name = head.request.adapter
        if not name or self.adapters is None:
            return -1
        while True:
            slot = self.adapters.slot_of(name)
            if slot is not None:
                return slot
            err = self.adapters.error_of(name)
            if err is None:
                self.adapters.request(name)
                return None
            queue = self.queues[head.client]
            queue.popleft()
            head.state = SeqState.FINISHED
            out.failed.append((head, err))
            if not queue:
                return None
            head = queue[0]
            name = head.request.adapter
            if not name:
                return -1
