"""VTC vs FCFS in the discrete-time serving model (`loragate/engine/fairness_sim.py`).

Scenario: 'heavy' sends 10 requests a step, clients a, b and c one each, for 40 steps (prompts
16-128 tokens, outputs 8-64; a server of 512 tokens and 16 sequences a step). Prints, per policy,
each client's service over the window in which all four were backlogged, its share, its mean
wait, and the worst service gap between two clients next to the proven VTC bound.
No model and no clock: runs in well under a second on any machine.
Usage: python -m bench.fairness [--seeds N] [--budget TOKENS] [--max-running SEQS]
"""
from __future__ import annotations

import argparse
import time
from itertools import combinations

from bench.common import machine
from loragate.engine.fairness import FCFSPolicy, VTCPolicy
from loragate.engine.fairness_sim import (ServerSpec, common_backlog, heavy_scenario, max_service_gap,
                                          request_cost_bound, simulate, vtc_bound)


def report(seed: int, server: ServerSpec) -> None:
    reqs = heavy_scenario(seed)
    c_max = request_cost_bound(reqs)
    bound = vtc_bound("a", "b", server, c_max)
    print(f"seed {seed}: {len(reqs)} requests, C_max {c_max:.0f}, proven bound 2*S*C_max = {bound:.0f}, "
          f"2*C_max = {2 * c_max:.0f}")
    for name, policy in (("VTC", VTCPolicy()), ("FCFS", FCFSPolicy())):
        res = simulate(reqs, policy, server)
        t1, t2 = common_backlog(res, res.clients)
        served = {c: res.service[c][t2] - res.service[c][t1] for c in res.clients}
        total = sum(served.values())
        gap = max(max_service_gap(res, f, g) for f, g in combinations(res.clients, 2))
        print(f"  {name:4s} steps {res.steps}, all backlogged over steps {t1}-{t2}, "
              f"max pairwise service gap {gap:.0f} ({'within' if gap <= bound else 'OVER'} bound)")
        for c in sorted(res.clients, key=lambda c: c != "heavy"):
            print(f"    {c:6s} service {served[c]:8.0f}  share {served[c] / total:6.1%}  "
                  f"mean wait {res.mean_wait(c):6.1f} steps")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--max-running", type=int, default=16)
    args = ap.parse_args()
    server = ServerSpec(args.budget, args.max_running)
    print(f"# bench/fairness.py  {time.strftime('%Y-%m-%d')}  {machine()}  (a simulation: no clock, any machine)")
    for seed in range(args.seeds):
        report(seed, server)


if __name__ == "__main__":
    main()
