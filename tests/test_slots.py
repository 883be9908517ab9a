"""`--max-loras auto`: the slot sizing as pure functions (model shapes, rank, targets, fraction,
memory), and an engine started with `auto` on the CPU: its slots hold only the start-up adapters'
groups, give the same tokens as full slots, refuse an adapter outside them with a message naming the
fix, and report their count in /v1/adapters and /metrics."""
from __future__ import annotations

import json

import httpx
import pytest
import torch

from loragate.engine import engine as engine_module
from loragate.engine.adapters.peft_loader import load_peft_adapter
from loragate.engine.adapters.slots import (
    AUTO_MAX_LORAS,
    SlotSizingError,
    StartupAdapters,
    parse_target_modules,
    plan_slots,
    scan_adapters,
    slot_bytes,
    slot_groups,
)
from loragate.engine.async_engine import AsyncEngine
from loragate.engine.config import EngineConfig
from loragate.engine.errors import AdapterLoadError
from loragate.engine.model.lora import GROUPS, group_specs
from loragate.gateway import GatewaySettings, create_app
from loragate.testing import build_adapter

from engine_utils import make_engine, random_prompts, request, run_to_completion, tokens
from tests.test_gateway import running_server

MiB, GB = 2**20, 10**9
# Llama-3-8B: hidden 4096, 32 query heads and 8 KV heads of 128, MLP 14336, 32 layers
LLAMA8B = group_specs(4096, 4096, 1024, 14336)


def plan(**kw):
    args = dict(specs=LLAMA8B, num_layers=32, dtype=torch.bfloat16, max_rank=16, groups=("qkv",),
                requested="auto", fraction=0.1, free_bytes=125 * GB, startup_count=0, open_registration=True)
    args.update(kw)
    return plan_slots(**args)


# ---- pure sizing --------------------------------------------------------------------------------


def test_slot_bytes_of_an_8b_llama():
    # q|k|v at rank 16: A [3, 16, 4096] and B [4096 + 2 * 1024, 16] per layer, bf16
    qkv = slot_bytes(LLAMA8B, ("qkv",), 32, 16, torch.bfloat16)
    assert qkv == (3 * 4096 + 6144) * 16 * 32 * 2 == 18 * MiB
    every = slot_bytes(LLAMA8B, GROUPS, 32, 16, torch.bfloat16)
    assert every == qkv + (4096 + 4096 + 2 * 4096 + 2 * 14336 + 14336 + 4096) * 16 * 32 * 2
    assert slot_bytes(LLAMA8B, ("qkv",), 32, 64, torch.bfloat16) == 4 * qkv  # linear in --max-lora-rank
    assert slot_bytes(LLAMA8B, ("qkv",), 32, 16, torch.float32) == 2 * qkv


def test_auto_on_a_large_gpu_holds_hundreds_of_qv_adapters():
    """The issue's case: 141 GB GPU, ~16 GB of weights, rank-16 q/v adapters, 10% for adapters."""
    p = plan()
    assert p.auto and p.limited_by == "memory"
    assert p.max_loras == int(125 * GB * 0.1) // (18 * MiB) == 662
    assert p.total_bytes <= p.budget_bytes == int(125 * GB * 0.1)
    assert "662 adapter slots x 18.00 MiB" in p.describe() and "limited by memory" in p.describe()
    # every group at the default rank limit 64: 320 MiB a slot (17.8x), so 37 slots
    full = plan(groups=GROUPS, max_rank=64)
    assert full.bytes_per_slot == 320 * MiB and full.max_loras == 37


def test_auto_is_capped_and_bounded_by_the_adapters_there_are():
    assert plan(fraction=0.5).max_loras == AUTO_MAX_LORAS and plan(fraction=0.5).limited_by == "cap"
    closed = plan(startup_count=4, open_registration=False)
    assert (closed.max_loras, closed.limited_by) == (4, "adapters")
    assert plan(startup_count=0, open_registration=False).max_loras == 1  # LoRA on, no adapters: one slot
    # the memory limit still wins when it is the smaller
    tight = plan(startup_count=4000, open_registration=False, free_bytes=1 * GB)
    assert tight.limited_by == "memory" and tight.max_loras == int(GB * 0.1) // (18 * MiB)


def test_fixed_count_and_bad_inputs():
    fixed = plan(requested=16)
    assert (fixed.max_loras, fixed.auto, fixed.limited_by) == (16, False, "fixed")
    with pytest.raises(SlotSizingError, match="less than one adapter slot"):
        plan(free_bytes=100 * MiB)
    with pytest.raises(ValueError, match="adapter-memory-fraction"):
        plan(fraction=1.5)
    with pytest.raises(ValueError, match="at least 1"):
        plan(requested=0)


def test_groups_follow_the_startup_adapters_only_for_auto():
    qv = StartupAdapters(3, frozenset({"q_proj", "v_proj"}), (8,))
    mixed = StartupAdapters(2, frozenset({"v_proj", "down_proj"}), (8, 16))
    unknown = StartupAdapters(2, None, ())
    assert slot_groups("auto", True, qv) == ("qkv",)
    assert slot_groups("auto", True, mixed) == ("qkv", "down")
    assert slot_groups("auto", True, unknown) == GROUPS
    assert slot_groups("auto", True, StartupAdapters(0, frozenset(), ())) == GROUPS  # none yet: all
    assert slot_groups("auto", False, qv) == GROUPS  # a fixed --max-loras keeps every group
    assert slot_groups("all", True, qv) == GROUPS
    assert slot_groups(("o_proj", "up_proj"), False, qv) == ("o", "gate_up")


def test_parse_target_modules():
    assert parse_target_modules("auto") == "auto" and parse_target_modules(" all ") == "all"
    assert parse_target_modules("q_proj, v_proj") == ("q_proj", "v_proj")
    for bad in ("", "q_proj,lm_head", "embed_tokens"):
        with pytest.raises(ValueError, match="--lora-target-modules"):
            parse_target_modules(bad)


def test_scan_reads_targets_and_ranks(tmp_path):
    def adapter(name, cfg):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
        return str(d)

    a = adapter("a", {"r": 8, "target_modules": ["model.layers.0.self_attn.q_proj", "v_proj"]})
    b = adapter("b", {"r": 4, "target_modules": ["down_proj"], "rank_pattern": {"down_proj": 32}})
    s = scan_adapters([a, b])
    assert s.count == 2 and s.modules == {"q_proj", "v_proj", "down_proj"} and sorted(s.ranks) == [8, 32]
    assert scan_adapters([adapter("d", {"r": 8, "target_modules": "all-linear"})]).modules == frozenset(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert scan_adapters([a, adapter("e", {"r": 8, "target_modules": ".*attn.*"})]).modules is None  # a regex
    assert scan_adapters([a, adapter("f", "{not json")]).modules is None
    assert scan_adapters([a, str(tmp_path / "missing")]).count == 2


# ---- an engine started with auto on the CPU -------------------------------------------------------


@pytest.fixture(scope="module")
def qv_adapters(checkpoints, tmp_path_factory):
    base = checkpoints("llama3")
    root = tmp_path_factory.mktemp("slot-adapters")
    return base, {
        "qv": build_adapter(base, root / "qv", rank=4, targets=("q_proj", "v_proj"), seed=1),
        "vdown": build_adapter(base, root / "vdown", rank=8, targets=("v_proj", "down_proj"), seed=2),
        "mlp": build_adapter(base, root / "extra" / "mlp", rank=4, targets=("gate_proj", "up_proj"), seed=3),
    }


def test_auto_engine_slots_hold_the_startup_targets_and_match_full_slots(qv_adapters):
    base, ads = qv_adapters
    startup = (("qv", str(ads["qv"])), ("vdown", str(ads["vdown"])))
    auto = make_engine(base, adapters=startup)  # EngineConfig's default is max_loras="auto"
    try:
        p = auto.slot_plan
        assert (p.auto, p.max_loras, p.limited_by, p.groups) == (True, 2, "adapters", ("qkv", "down"))
        assert auto.lora.nbytes_per_slot() == p.bytes_per_slot  # the plan is what was allocated
        assert set(auto.lora.A[0]) == {"qkv", "down"} and auto.stats().lora_slots == 2
        # an adapter outside those groups is refused by name, with the fix
        with pytest.raises(AdapterLoadError, match="--lora-target-modules all"):
            load_peft_adapter(ads["mlp"], "mlp", auto.base_info, 64)
        prompts = random_prompts(4, 400, seed=3)
        reqs = {0: [request(p_, adapter=["qv", "vdown", None, "qv"][i], max_tokens=6, ignore_eos=True)
                    for i, p_ in enumerate(prompts)]}
        got = run_to_completion(auto, reqs)
    finally:
        auto.shutdown()
    full = make_engine(base, adapters=startup, max_loras=4)  # a fixed count: every group
    try:
        assert set(full.lora.A[0]) == set(GROUPS)
        reqs2 = {0: [request(r.prompt_token_ids, adapter=r.adapter, max_tokens=6, ignore_eos=True) for r in reqs[0]]}
        want = run_to_completion(full, reqs2)
    finally:
        full.shutdown()
    assert [tokens(got[r.request_id]) for r in reqs[0]] == [tokens(want[r.request_id]) for r in reqs2[0]]


def test_auto_engine_reports_its_slots_in_adapters_and_metrics(qv_adapters, monkeypatch):
    """Open registration (an adapter dir): the count follows from memory, here a fixed 64 MiB left
    after the weights so the expected number is exact."""
    base, ads = qv_adapters
    monkeypatch.setattr(engine_module, "available_bytes", lambda device: 64 * MiB)
    adapter_dir = str(ads["qv"].parent)
    cfg = EngineConfig(model=str(base), served_model_name="tiny", dtype="float32", device="cpu",
                       adapter_dir=adapter_dir, kv_cache_memory=8 << 20, block_size=4, max_lora_rank=8,
                       adapter_memory_fraction=0.05)
    engine = AsyncEngine(cfg)
    p = engine.engine.slot_plan
    per = slot_bytes(engine.engine.model.lora_specs, ("qkv", "down"), 2, 8, torch.float32)
    assert p.groups == ("qkv", "down") and p.bytes_per_slot == per
    assert p.max_loras == int(64 * MiB * 0.05) // per and p.limited_by == "memory" and p.max_loras > 2
    with running_server(create_app(engine, GatewaySettings())) as url:
        r = httpx.post(url + "/v1/completions", json={"model": "qv", "prompt": "hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200, r.text
        listing = httpx.get(url + "/v1/adapters", timeout=30).json()
        assert listing["slots"] == {"total": p.max_loras, "used": 1}
        assert {a["id"] for a in listing["data"]} == {"qv", "vdown"}
        metrics = httpx.get(url + "/metrics", timeout=30).text
        assert f"loragate_adapter_slots_total {float(p.max_loras)}" in metrics
        assert "loragate_adapter_slots_used 1.0" in metrics


def test_cli_refuses_a_fraction_too_small_for_one_slot(checkpoints, capsys):
    from loragate import cli

    rc = cli.main(["serve", "--model", str(checkpoints("llama3")), "--device", "cpu", "--dtype", "float32",
                   "--kv-cache-memory", "8MiB", "--adapter-memory-fraction", "1e-12", "--log-level", "warning"])
    err = capsys.readouterr().err
    assert rc == 1 and "less than one adapter slot" in err and "raise the fraction" in err
    assert "Traceback" not in err
