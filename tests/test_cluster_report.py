"""The cluster's pure parts, without Ray: folding replica reports into one engine view, the state
board's staleness rule, and the `--ray-*` flags."""
from __future__ import annotations

import sys

import pytest

from loragate.cli import build_parser, main
from loragate.cluster import state as state_module
from loragate.cluster.config import ClusterConfig, cluster_config
from loragate.cluster.report import ReplicaReport, aggregate_adapters, aggregate_lora, aggregate_stats
from loragate.cluster.state import ClusterState
from loragate.engine.outputs import AdapterStats, EngineStats, LoraState


def adapter(name: str, tier: str, served: int = 0, loads: int = 0, seconds: float | None = None) -> AdapterStats:
    return AdapterStats(name, f"/adapters/{name}", tier, 1000, 8, served, loads, seconds)


def report(rid: str, running: int, waiting: int, used: int, adapters, lora: LoraState, alive: bool = True):
    return ReplicaReport(rid, f"actor-{rid}", EngineStats(running, waiting, used, 100, 7, alive, 1),
                         tuple(adapters), lora, ())


R1 = report("r1", 2, 1, 30, [adapter("a", "device", 5, 1, 0.2), adapter("b", "cpu", 1, 1, 0.1)],
            LoraState(("a",), ("c",), 4))
R2 = report("r2", 1, 0, 10, [adapter("b", "device", 3, 2, 0.3), adapter("c", "loading")],
            LoraState(("b",), ("a",), 4), alive=False)


def test_counters_are_summed_and_alive_if_any():
    s = aggregate_stats([R1, R2])
    assert (s.running, s.waiting, s.kv_blocks_used, s.kv_blocks_total, s.steps, s.preemptions) == (3, 1, 40, 200, 14, 2)
    assert s.alive
    assert not aggregate_stats([R2]).alive and not aggregate_stats([]).alive


def test_lora_state_running_anywhere_waiting_nowhere_resident():
    # "a" waits on r2 but is resident on r1: the cluster can serve it, so it is running, not waiting
    assert aggregate_lora([R1, R2]) == LoraState(("a", "b"), ("c",), 8)
    assert aggregate_lora([]) == LoraState((), (), 0)


def test_adapters_take_the_best_tier_and_sum_their_use(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "adapter_model.safetensors").write_bytes(b"x" * 123)
    paths = {"a": "/adapters/a", "b": "/adapters/b", "c": "/adapters/c", "d": str(tmp_path / "d")}
    out = {a.name: a for a in aggregate_adapters(["a", "b", "c", "d"], paths.get, [R1, R2])}
    assert (out["a"].tier, out["a"].requests_served, out["a"].load_count) == ("device", 5, 1)
    assert (out["b"].tier, out["b"].requests_served, out["b"].load_count) == ("device", 4, 3)
    assert out["b"].last_load_seconds == 0.3
    assert out["c"].tier == "loading"
    assert (out["d"].tier, out["d"].size_bytes, out["d"].requests_served) == ("disk", 123, 0)  # no replica saw it


def test_board_drops_replicas_that_went_silent(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(state_module.time, "monotonic", lambda: now[0])
    board = ClusterState(stale_after=3.0)
    board.report(R1)
    board.report(R2)
    assert [r.replica_id for r in board.snapshot()] == ["r1", "r2"]
    now[0] = 102.0
    board.report(R1)
    now[0] = 104.0  # r2 last reported 4 s ago
    assert [r.replica_id for r in board.snapshot()] == ["r1"]
    board.forget("r1")
    assert board.snapshot() == []


def test_ray_flags_build_the_cluster_config():
    args = build_parser().parse_args(["serve", "--ray-replicas", "3", "--no-ray-multiplex",
                                      "--ray-max-ongoing-requests", "12", "--ray-num-gpus-per-replica", "0.5",
                                      "--ray-address", "auto"])
    cfg = cluster_config(args)
    assert (cfg.replicas, cfg.multiplex, cfg.max_ongoing_requests, cfg.replica_num_gpus, cfg.ray_address) == \
        (3, False, 12, 0.5, "auto")
    defaults = cluster_config(build_parser().parse_args(["serve"]))
    assert defaults.multiplex and defaults.replica_num_gpus is None and defaults.ingress_replicas == 1
    with pytest.raises(ValueError):
        ClusterConfig(replicas=0)


def test_ray_replicas_without_ray_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as where it is not installed
    with pytest.raises(SystemExit) as e:
        main(["serve", "--ray-replicas", "2"])
    assert "loragate[ray]" in str(e.value)
