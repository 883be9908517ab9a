"""Whom to admit next: fair sharing of the server across clients (tenants, else adapters).

The scheduler keeps one FIFO queue per client and, while a step has room, asks the policy which
backlogged client's head request to admit. The policy only ranks clients; it never sees tensors,
blocks or adapters, so it can be tested (and simulated, see `fairness_sim.py`) on its own.

`VTCPolicy` is the Virtual Token Counter of Sheng et al., "Fairness in Serving Large Language
Models" (OSDI'24). Every client has a counter of the service it received, in cost units
`input_cost * prompt_tokens + output_cost * output_tokens`, divided by its weight, where
prompt_tokens counts only the prompt tokens actually prefilled: those served from the prefix cache
cost the server nothing and are not charged (nor is a prompt recomputed after preemption charged
twice), so a tenant whose requests share a cached system prompt is not billed as if it had
prefilled all of it. The backlogged client with the smallest counter is admitted next (ties:
earliest head arrival, then name, so runs are deterministic). With a single backlogged client
that client is always picked: VTC is work-conserving, unlike a rate limit it never leaves capacity
idle while someone waits.

Counter lift (the paper's rule): when a client becomes backlogged (its queue goes from empty to
non-empty) its counter is raised to

* `max(own, min counter over the other backlogged clients)` if anyone is backlogged, else
* `max(own, counter of the last client to leave the queue)`; that is the last client picked,
  because admission is how clients leave the queue in steady state.

Why: without the lift, a client that was idle (or new, counter 0) would come back with a counter
far below everybody else's and be picked every time until it caught up: it would have "banked"
credit while it did not want service, and starve the clients that kept the server busy. Lifting
to the current minimum puts it level with the least-served backlogged client, so it is neither
starved (it ties with the minimum, so it is picked at once) nor bursting. When the queue is empty
the minimum is undefined; the last departing client's counter plays the same role, since every
client still queued before it left had a counter at least as large as its own at that pick.

Bound (the paper's Theorem, restated for our charging; proof in `fairness_sim.py`): if every
backlogged client's head is admissible, then for any two clients f, g backlogged throughout an
interval, |W_f - W_g| <= U_f + U_g, where W is service/weight in the interval and
U_i = S * C_max / w_i, with S the maximum number of running sequences and C_max the largest cost of
one request. In the engine a head may be inadmissible (adapter not yet resident, no KV blocks);
the bound then holds among the clients whose heads were candidates.

`FCFSPolicy` admits the earliest head arrival: the usual default of serving engines, and the
baseline that shows why VTC exists (a client sending 10x the requests gets ~10x the service).
"""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class FairnessPolicy(Protocol):
    """What the scheduler needs from a fairness policy (see the module docstring)."""

    def on_enqueue(self, client: str, backlogged_clients: Collection[str]) -> None:
        """`client` just became backlogged; `backlogged_clients` are the others already queued."""

    def pick(self, candidates: Sequence[tuple[str, float]]) -> str:
        """Choose among (client, arrival time of its head request); candidates is non-empty."""

    def charge(self, client: str, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        """Record service: prompt tokens prefilled (not those found in the prefix cache) and tokens
        generated for `client`."""

    def counters(self) -> dict[str, float]:
        """Per-client service counters, for metrics and tests."""

    def forget(self, client: str) -> None:
        """Drop state of an idle client when that cannot change future decisions."""


def _earliest(candidates: Sequence[tuple[str, float]]) -> str:
    if not candidates:
        raise ValueError("pick() needs at least one candidate")
    return min(candidates, key=lambda c: (c[1], c[0]))[0]


class VTCPolicy:
    """Virtual Token Counter: least weighted service first, with the counter lift on arrival.

    O(candidates) per pick, O(backlogged) per enqueue, O(1) per charge: the number of clients with
    queued work is small next to a step's cost, so a heap would buy nothing but invalidation logic.
    """

    def __init__(self, weights: Mapping[str, float] | None = None, input_cost: float = 1.0,
                 output_cost: float = 2.0, default_weight: float = 1.0) -> None:
        for name, w in (weights or {}).items():
            if not w > 0:
                raise ValueError(f"weight of {name!r} must be positive, got {w}")
        if not default_weight > 0:
            raise ValueError(f"default_weight must be positive, got {default_weight}")
        if input_cost < 0 or output_cost < 0:
            raise ValueError("token costs must be non-negative")
        self.weights = dict(weights or {})
        self.input_cost = input_cost
        self.output_cost = output_cost
        self.default_weight = default_weight
        self._counters: dict[str, float] = {}
        self._last_picked: str | None = None
        # Counter of the least-served candidate at the latest pick; never decreases. Clients whose
        # counter is at or below it can be forgotten: any future lift puts them at least here.
        self._floor = 0.0

    def weight(self, client: str) -> float:
        return self.weights.get(client, self.default_weight)

    def counter(self, client: str) -> float:
        return self._counters.get(client, self._floor)

    def on_enqueue(self, client: str, backlogged_clients: Collection[str]) -> None:
        others = [self.counter(c) for c in backlogged_clients if c != client]
        if others:
            target = min(others)
        elif self._last_picked is not None:
            target = self.counter(self._last_picked)
        else:
            target = self._floor
        self._counters[client] = max(self.counter(client), target)

    def pick(self, candidates: Sequence[tuple[str, float]]) -> str:
        if not candidates:
            raise ValueError("pick() needs at least one candidate")
        client, _ = min(candidates, key=lambda c: (self.counter(c[0]), c[1], c[0]))
        self._last_picked = client
        self._floor = max(self._floor, self.counter(client))
        return client

    def charge(self, client: str, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        cost = self.input_cost * prompt_tokens + self.output_cost * output_tokens
        self._counters[client] = self.counter(client) + cost / self.weight(client)

    def counters(self) -> dict[str, float]:
        return dict(self._counters)

    def forget(self, client: str) -> None:
        """Forget an idle client only if it is at or below the floor: a lift would bring it back
        to at least the floor anyway. An over-served client keeps its debt."""
        if self._counters.get(client, self._floor) <= self._floor:
            self._counters.pop(client, None)
            if self._last_picked == client:
                self._last_picked = None


class FCFSPolicy:
    """Earliest head arrival first (ties by name). Tracks raw service only for metrics."""

    def __init__(self, input_cost: float = 1.0, output_cost: float = 2.0) -> None:
        self.input_cost = input_cost
        self.output_cost = output_cost
        self._service: dict[str, float] = {}

    def on_enqueue(self, client: str, backlogged_clients: Collection[str]) -> None:
        self._service.setdefault(client, 0.0)

    def pick(self, candidates: Sequence[tuple[str, float]]) -> str:
        return _earliest(candidates)

    def charge(self, client: str, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        cost = self.input_cost * prompt_tokens + self.output_cost * output_tokens
        self._service[client] = self._service.get(client, 0.0) + cost

    def counters(self) -> dict[str, float]:
        return dict(self._service)

    def forget(self, client: str) -> None:
        self._service.pop(client, None)


def make_policy(name: str, weights: Mapping[str, float] | None = None) -> FairnessPolicy:
    """Build the policy named by `EngineConfig.fairness` ("vtc" or "fcfs")."""
    key = name.lower()
    if key == "vtc":
        return VTCPolicy(weights)
    if key == "fcfs":
        return FCFSPolicy()
    raise ValueError(f"unknown fairness policy {name!r}; expected 'vtc' or 'fcfs'")
