"""Fairness policies: VTC's rules on their own, then measured in the discrete-time simulator.

The bound checked everywhere is the one proven in `loragate/engine/fairness_sim.py`: for clients
f, g backlogged throughout an interval, |W_f - W_g| <= S * C_max * (1/w_f + 1/w_g).
"""
from __future__ import annotations

import random

import pytest

from loragate.engine.fairness import FairnessPolicy, FCFSPolicy, VTCPolicy, make_policy
from loragate.engine.fairness_sim import (ServerSpec, SimRequest, SimResult, burst, common_backlog,
                                          heavy_scenario, max_service_gap, request_cost_bound,
                                          simulate, vtc_bound)

SERVER = ServerSpec(token_budget=512, max_running=16)
LIGHT = ("a", "b", "c")


class NoLiftVTC(VTCPolicy):
    """VTC without the counter lift: a (re)joining client keeps its old (or zero) counter."""

    def on_enqueue(self, client, backlogged_clients):
        self._counters.setdefault(client, 0.0)


def window_service(res: SimResult, window: tuple[int, int]) -> dict[str, float]:
    t1, t2 = window
    return {c: res.service[c][t2] - res.service[c][t1] for c in res.clients}


def assert_bound_all_pairs(res: SimResult, reqs: list[SimRequest], weights=None) -> None:
    c_max = request_cost_bound(reqs)
    for i, f in enumerate(res.clients):
        for g in res.clients[i + 1:]:
            gap = max_service_gap(res, f, g, weights)
            assert gap <= vtc_bound(f, g, SERVER, c_max, weights), (f, g, gap)


def assert_work_conserving(res: SimResult) -> None:
    """Whenever someone is still queued after a step, the step was full (budget or seq cap)."""
    for t in range(res.steps):
        if any(res.backlogged[c][t] for c in res.clients):
            assert res.tokens[t] == SERVER.token_budget or res.running[t] == SERVER.max_running, t


# ---- the policy on its own ---------------------------------------------------------------------
def test_policies_satisfy_protocol_and_factory():
    assert isinstance(make_policy("vtc"), VTCPolicy)
    assert isinstance(make_policy("FCFS"), FCFSPolicy)
    assert isinstance(make_policy("vtc", {"t": 2.0}), FairnessPolicy)
    assert make_policy("vtc", {"t": 2.0}).weight("t") == 2.0
    with pytest.raises(ValueError):
        make_policy("lottery")
    with pytest.raises(ValueError):
        VTCPolicy({"t": 0.0})
    with pytest.raises(ValueError):
        VTCPolicy().pick([])


def test_vtc_picks_least_counter_then_earliest_then_name():
    p = VTCPolicy()
    p.charge("x", prompt_tokens=10)
    p.charge("y", output_tokens=3)  # 6 < 10
    assert p.pick([("x", 0.0), ("y", 5.0)]) == "y"
    p.charge("y", prompt_tokens=4)  # now both 10: earliest arrival wins
    assert p.pick([("x", 3.0), ("y", 1.0)]) == "y"
    assert p.pick([("y", 1.0), ("x", 1.0)]) == "x"
    assert p.pick([("x", 9.0)]) == "x"  # a lone candidate is always served


def test_vtc_charge_uses_costs_and_weights():
    p = VTCPolicy({"gold": 4.0}, input_cost=1.5, output_cost=3.0)
    p.charge("gold", prompt_tokens=8, output_tokens=2)
    p.charge("std", prompt_tokens=8, output_tokens=2)
    assert p.counters()["std"] == pytest.approx(1.5 * 8 + 3.0 * 2)
    assert p.counters()["gold"] == pytest.approx(p.counters()["std"] / 4)


def test_lift_to_min_of_backlogged_never_lowers():
    p = VTCPolicy()
    p.charge("a", prompt_tokens=100)
    p.charge("b", prompt_tokens=40)
    p.on_enqueue("new", ["a", "b"])
    assert p.counters()["new"] == 40
    p.charge("rich", prompt_tokens=500)
    p.on_enqueue("rich", ["a", "b", "new"])
    assert p.counters()["rich"] == 500  # an over-served client keeps its debt


def test_lift_when_nobody_backlogged_uses_last_picked():
    p = VTCPolicy()
    p.on_enqueue("a", [])
    assert p.pick([("a", 0.0)]) == "a"
    p.charge("a", prompt_tokens=300, output_tokens=50)
    p.on_enqueue("b", [])  # everyone idle: b must not come back with 300+ credits over a
    assert p.counters()["b"] == p.counters()["a"]


def test_forget_only_drops_what_a_lift_would_restore():
    p = VTCPolicy()
    for c in ("a", "b"):
        p.on_enqueue(c, [])
    p.charge("a", prompt_tokens=50)
    assert p.pick([("a", 0.0), ("b", 0.0)]) == "b"  # floor is now b's 0
    p.charge("b", prompt_tokens=10)
    p.forget("a")  # a is above the floor: it must keep its debt
    assert p.counters()["a"] == 50
    p.pick([("a", 0.0), ("b", 0.0)])  # b (10) again; floor 10
    p.charge("b", prompt_tokens=100)
    assert p.pick([("a", 0.0), ("b", 0.0)]) == "a"  # floor 50
    p.forget("a")
    assert "a" not in p.counters()
    p.on_enqueue("a", ["b"])
    assert p.counters()["a"] == 110  # lifted straight back to the backlog's minimum


def test_fcfs_picks_earliest_head():
    p = FCFSPolicy()
    p.charge("x", prompt_tokens=1000)
    assert p.pick([("y", 2.0), ("x", 1.0)]) == "x"
    assert p.pick([("y", 1.0), ("x", 1.0)]) == "x"


# ---- measured in the simulator ------------------------------------------------------------------
def test_vtc_bounds_heavy_client_fcfs_does_not():
    reqs = heavy_scenario(light=LIGHT)
    vtc, fcfs = simulate(reqs, VTCPolicy(), SERVER), simulate(reqs, FCFSPolicy(), SERVER)
    c_max = request_cost_bound(reqs)
    bound = vtc_bound("heavy", "a", SERVER, c_max)
    for res in (vtc, fcfs):
        assert sum(res.pending.values()) == 0 and sum(map(len, res.waits.values())) == len(reqs)

    # VTC: every pair, every interval of common backlog, within the proven bound
    assert_bound_all_pairs(vtc, reqs)
    assert_work_conserving(vtc)
    window = common_backlog(vtc, vtc.clients)
    assert window[1] - window[0] > 100  # the scenario really keeps all four backlogged
    served = window_service(vtc, window)
    for c in LIGHT:
        assert abs(served[c] - served["heavy"]) <= bound

    # FCFS in the same scenario: heavy takes most of the server and blows through the bound
    window = common_backlog(fcfs, fcfs.clients)
    served = window_service(fcfs, window)
    for c in LIGHT:
        assert served[c] / served["heavy"] < 0.5
        assert max_service_gap(fcfs, "heavy", c) > bound
        assert fcfs.mean_wait(c) > 2 * vtc.mean_wait(c)


def test_work_conservation_single_client_gets_full_server():
    reqs = burst("solo", 0, 30, 3, random.Random(1))
    vtc, fcfs = simulate(reqs, VTCPolicy(), SERVER), simulate(reqs, FCFSPolicy(), SERVER)
    assert_work_conserving(vtc)
    assert vtc.tokens == fcfs.tokens and vtc.service == fcfs.service and vtc.waits == fcfs.waits


def test_weighted_client_gets_proportional_service():
    weights = {"gold": 2.0, "std": 1.0}
    rng = random.Random(2)
    reqs = burst("gold", 0, 60, 3, rng) + burst("std", 0, 60, 3, rng)
    res = simulate(reqs, VTCPolicy(weights), SERVER)
    assert_bound_all_pairs(res, reqs, weights)
    window = common_backlog(res, ["gold", "std"])
    served = window_service(res, window)
    slack = vtc_bound("gold", "std", SERVER, request_cost_bound(reqs), weights)
    ratio = served["gold"] / served["std"]
    # |gold/2 - std| <= slack  =>  |ratio - 2| <= 2 * slack / std
    assert abs(ratio - 2) <= 2 * slack / served["std"]
    assert 1.5 < ratio < 2.5  # and visibly not an equal split


def late_joiner_workload(seed: int = 3) -> list[SimRequest]:
    """a and b keep the server busy from step 0; newcomer c bursts in at step 500."""
    rng = random.Random(seed)
    return burst("a", 0, 600, 1, rng) + burst("b", 0, 600, 1, rng) + burst("c", 500, 20, 10, rng)


def test_newcomer_neither_starved_nor_bursting():
    reqs = late_joiner_workload()
    c_max = request_cost_bound(reqs)
    res = simulate(reqs, VTCPolicy(), SERVER)
    assert_bound_all_pairs(res, reqs)
    max_out = max(r.output_tokens for r in reqs)
    assert res.waits["c"][0] <= max_out  # admitted as soon as a running slot frees
    # Without the lift c arrives with counter 0 against a and b's hundreds of steps of service:
    # it takes the whole server and the others get nothing.
    unfair = simulate(reqs, NoLiftVTC(), SERVER)
    assert max_service_gap(unfair, "a", "c", start=500) > vtc_bound("a", "c", SERVER, c_max)
    assert max_service_gap(res, "a", "c", start=500) <= vtc_bound("a", "c", SERVER, c_max)


def test_idle_clients_do_not_bank_credit():
    rng = random.Random(4)
    # b is served a little, goes idle while a keeps the server busy, then returns with a burst
    reqs = burst("a", 0, 400, 2, rng) + burst("b", 0, 5, 1, rng) + burst("b", 250, 20, 10, rng)
    c_max = request_cost_bound(reqs)
    res, unfair = simulate(reqs, VTCPolicy(), SERVER), simulate(reqs, NoLiftVTC(), SERVER)
    assert_bound_all_pairs(res, reqs)
    assert max_service_gap(unfair, "a", "b", start=250) > vtc_bound("a", "b", SERVER, c_max)


def test_no_credit_banked_across_an_idle_server():
    rng = random.Random(5)
    # b is served a little, a a lot; the server drains and idles; b comes back to an empty queue
    # (lifted to a's counter, a being the last served), and a returns shortly after
    reqs = (burst("a", 0, 50, 2, rng) + burst("b", 0, 2, 1, rng)
            + burst("b", 600, 30, 4, rng) + burst("a", 605, 30, 4, rng))
    c_max = request_cost_bound(reqs)
    res, unfair = simulate(reqs, VTCPolicy(), SERVER), simulate(reqs, NoLiftVTC(), SERVER)
    idle = [t for t in range(res.steps) if res.tokens[t] == 0]
    assert idle and idle[0] < 600  # the server did go idle in between
    assert max_service_gap(res, "a", "b", start=605) <= vtc_bound("a", "b", SERVER, c_max)
    assert max_service_gap(unfair, "a", "b", start=605) > vtc_bound("a", "b", SERVER, c_max)


@pytest.mark.parametrize("seed", range(25))
def test_vtc_bound_holds_on_random_workloads(seed):
    """Random clients (2-5), weights, burst windows, rates and sizes; seeded, so deterministic."""
    rng = random.Random(seed)
    names = [f"t{i}" for i in range(rng.randint(2, 5))]
    w = {name: rng.choice([0.5, 1.0, 2.0, 3.0]) for name in names}
    reqs: list[SimRequest] = []
    for name in names:
        start, steps = rng.randint(0, 60), rng.randint(5, 60)
        reqs += burst(name, start, steps, rng.randint(1, 6), rng, prompt=(1, 300), output=(1, 80))
    res = simulate(reqs, VTCPolicy(w), SERVER)
    assert sum(map(len, res.waits.values())) == len(reqs)
    assert_bound_all_pairs(res, reqs, w)
    assert_work_conserving(res)
