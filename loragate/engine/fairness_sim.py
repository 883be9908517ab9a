"""A deterministic discrete-time model of the serving loop, for measuring fairness policies.

No model, no clock: one step is one forward pass. Each step has a token budget and a cap on
running sequences, like `Scheduler.schedule()`:

1. running sequences go first: a sequence still prefilling processes the next chunk of its prompt
   (as much as the budget allows), a decoding one takes one token; the step in which a prompt's
   last chunk runs also yields the first output token (as in the engine);
2. the rest of the budget admits waiting requests, one `policy.pick` at a time, each admitted
   request prefilling a first chunk at once;
3. every token is charged to its client as it is processed (prompt tokens on prefill, one output
   token per generated token), right after it is scheduled, so each pick sees current counters.

Requests arrive at the start of their arrival step, before admission. There is no KV limit and no
preemption: the model isolates the admission decision.

Proof of the bound asserted in the tests (for VTC in this model, all heads always admissible).
Write c_i for i's counter (service/weight, plus lifts), S for the running cap, C_max for the
largest cost of one request, U_i = S * C_max / w_i.
(a) Floors. Call m a floor from time p on if every client backlogged at any time >= p has a
    counter >= m. If client l is picked at p, c_l(p) is a floor from p on: l had the least counter
    among the backlogged at p; a client joining later is lifted to the minimum over the backlogged
    (all >= m by induction) or, when nobody is backlogged, to the counter of the last picked
    client (>= m by induction, at its pick); counters never decrease. Likewise, the value a client
    is lifted to at its join is a floor from then on, as long as that client stays backlogged.
(b) Let f, g be backlogged at time t, and tau <= t the last pick or join of f. Since tau f's
    counter grew only by the rest of the cost of the requests it had running at tau: at most S
    requests, each at most C_max / w_f. And c_f(tau) is at most a floor from tau on: if tau is a
    pick, c_f(tau) is one; if a join whose lift took effect, the lifted value is one; if a join
    that found f already above the target, f's counter since its last pick p < tau grew only by
    what was running at p, and c_f(p) is a floor (take tau = p). Since g is backlogged at t,
    c_g(t) >= that floor, so c_f(t) - c_g(t) <= U_f.
(c) If f and g are both backlogged throughout [t1, t2], neither joined in (t1, t2], so
    W_f - W_g = (c_f - c_g)(t2) - (c_f - c_g)(t1) <= U_f + U_g, and symmetrically.
This mirrors the paper's 2U bound, where U is the cost of a full batch of tokens.
"""
from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from loragate.engine.fairness import FairnessPolicy


@dataclass(frozen=True)
class SimRequest:
    client: str
    arrival: int  # step at whose start the request is queued
    prompt_tokens: int
    output_tokens: int

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.output_tokens < 1 or self.arrival < 0:
            raise ValueError(f"invalid request {self}")


@dataclass(frozen=True)
class ServerSpec:
    token_budget: int = 512  # prefill + decode tokens per step
    max_running: int = 16  # running sequences


@dataclass
class _Running:
    req: SimRequest
    prefilled: int = 0
    generated: int = 0


@dataclass
class SimResult:
    """Per-client traces, one entry per step (index t = state after step t)."""

    clients: list[str]
    service: dict[str, list[float]]  # cumulative cost units (input_cost*prompt + output_cost*out)
    backlogged: dict[str, list[bool]]  # had queued (not yet admitted) requests after the step
    waits: dict[str, list[int]]  # per admitted request: admission step - arrival step
    tokens: list[int]  # tokens processed in each step
    running: list[int]  # running sequences after admission in each step
    pending: dict[str, int] = field(default_factory=dict)  # never admitted when the run ended

    @property
    def steps(self) -> int:
        return len(self.tokens)

    def mean_wait(self, client: str) -> float:
        w = self.waits[client]
        return sum(w) / len(w) if w else float("nan")


def simulate(requests: Iterable[SimRequest], policy: FairnessPolicy, server: ServerSpec = ServerSpec(),
             input_cost: float = 1.0, output_cost: float = 2.0, max_steps: int = 100_000) -> SimResult:
    """Run `requests` through the model under `policy` until all finish (or `max_steps`)."""
    arrivals = sorted(requests, key=lambda r: (r.arrival, r.client))
    clients = sorted({r.client for r in arrivals})
    queues: dict[str, deque[SimRequest]] = {c: deque() for c in clients}
    service = {c: 0.0 for c in clients}
    res = SimResult(clients, {c: [] for c in clients}, {c: [] for c in clients},
                    {c: [] for c in clients}, [], [])
    running: list[_Running] = []
    nxt = 0

    def charge(client: str, prompt: int = 0, output: int = 0) -> None:
        policy.charge(client, prompt_tokens=prompt, output_tokens=output)
        service[client] += input_cost * prompt + output_cost * output

    def advance(run: _Running, budget: int) -> int:
        """Process run's next chunk within budget; returns tokens used."""
        req = run.req
        if run.prefilled < req.prompt_tokens:
            n = min(req.prompt_tokens - run.prefilled, budget)
            run.prefilled += n
            charge(req.client, prompt=n)
            if run.prefilled == req.prompt_tokens:
                run.generated += 1
                charge(req.client, output=1)
            return n
        run.generated += 1
        charge(req.client, output=1)
        return 1

    for step in range(max_steps):
        while nxt < len(arrivals) and arrivals[nxt].arrival <= step:
            req = arrivals[nxt]
            nxt += 1
            if not queues[req.client]:
                policy.on_enqueue(req.client, [c for c in clients if queues[c]])
            queues[req.client].append(req)
        budget = server.token_budget
        for run in running:
            if budget == 0:
                break
            budget -= advance(run, budget)
        while budget > 0 and len(running) < server.max_running:
            candidates = [(c, float(q[0].arrival)) for c, q in queues.items() if q]
            if not candidates:
                break
            client = policy.pick(candidates)
            req = queues[client].popleft()
            res.waits[client].append(step - req.arrival)
            run = _Running(req)
            running.append(run)
            budget -= advance(run, budget)
        res.tokens.append(server.token_budget - budget)
        res.running.append(len(running))
        running = [r for r in running if r.generated < r.req.output_tokens]
        for c in clients:
            res.service[c].append(service[c])
            res.backlogged[c].append(bool(queues[c]))
        if nxt == len(arrivals) and not running and not any(queues.values()):
            break
    res.pending = {c: len(q) for c, q in queues.items()}
    return res


def request_cost_bound(requests: Iterable[SimRequest], input_cost: float = 1.0,
                       output_cost: float = 2.0) -> float:
    """C_max: the largest cost of one request (its prompt and output at full length)."""
    return max(input_cost * r.prompt_tokens + output_cost * r.output_tokens for r in requests)


def vtc_bound(f: str, g: str, server: ServerSpec, c_max: float,
              weights: Mapping[str, float] | None = None) -> float:
    """U_f + U_g with U_i = S * C_max / w_i: the proven limit on |W_f - W_g| (module docstring)."""
    w = weights or {}
    return server.max_running * c_max * (1 / w.get(f, 1.0) + 1 / w.get(g, 1.0))


def max_service_gap(res: SimResult, f: str, g: str, weights: Mapping[str, float] | None = None,
                    start: int = 0) -> float:
    """max |W_f - W_g| over intervals (from step `start` on) in which both stayed backlogged.

    W is service/weight in the interval. With D(t) = W_f(0,t) - W_g(0,t), the service difference
    over [t1, t2] is D(t2) - D(t1), so the worst interval inside one run of common backlog is
    max D - min D over that run: linear time instead of all pairs of steps.
    """
    w = weights or {}
    wf, wg = w.get(f, 1.0), w.get(g, 1.0)
    worst = 0.0
    lo = hi = None
    for t in range(start, res.steps):
        if res.backlogged[f][t] and res.backlogged[g][t]:
            d = res.service[f][t] / wf - res.service[g][t] / wg
            lo = d if lo is None else min(lo, d)
            hi = d if hi is None else max(hi, d)
            worst = max(worst, hi - lo)
        else:
            lo = hi = None
    return worst


def common_backlog(res: SimResult, clients: Iterable[str]) -> tuple[int, int]:
    """The longest run of steps [t1, t2] at whose ends all `clients` were backlogged."""
    names = list(clients)
    best, cur = (0, -1), None
    for t in range(res.steps):
        if all(res.backlogged[c][t] for c in names):
            cur = t if cur is None else cur
            if t - cur > best[1] - best[0]:
                best = (cur, t)
        else:
            cur = None
    return best


def burst(client: str, start: int, steps: int, per_step: int, rng: random.Random,
          prompt: tuple[int, int] = (16, 128), output: tuple[int, int] = (8, 64)) -> list[SimRequest]:
    """`per_step` requests a step for `steps` steps from `start`, sizes uniform in the ranges."""
    return [SimRequest(client, t, rng.randint(*prompt), rng.randint(*output))
            for t in range(start, start + steps) for _ in range(per_step)]


def heavy_scenario(seed: int = 0, light: tuple[str, ...] = ("a", "b", "c"),
                   steps: int = 40) -> list[SimRequest]:
    """'heavy' sends 10 requests a step and each light client 1, for `steps` steps: several times
    what the server can do, so all stay backlogged for hundreds of steps under either policy."""
    rng = random.Random(seed)
    reqs = burst("heavy", 0, steps, 10, rng)
    for c in light:
        reqs += burst(c, 0, steps, 1, rng)
    return reqs
