"""Mixed-adapter batches are exact: every request's greedy tokens equal transformers + PEFT
running that adapter alone, also when adapters are evicted and reloaded mid-run."""
from __future__ import annotations

import pytest
import torch

from engine_utils import hf_greedy, make_engine, random_prompts, request, run_to_completion, tokens
from loragate.testing import DEFAULT_TARGETS, build_adapter

ADAPTERS = {
    # name: (rank, alpha, targets, extra LoraConfig kwargs)
    "a-qv-r8": (8, 16, ("q_proj", "v_proj"), {}),
    "b-all-r4": (4, 8, DEFAULT_TARGETS, {}),
    "c-mlp-r16": (16, 8, ("gate_proj", "up_proj", "down_proj"), {}),
    "d-o-r1": (1, 4, ("o_proj", "k_proj"), {}),
    "e-rslora-r12": (12, 24, ("q_proj", "k_proj", "v_proj", "down_proj"), {"use_rslora": True}),
    "f-pattern": (6, 12, ("q_proj", "up_proj"), {"rank_pattern": {"up_proj": 3}, "alpha_pattern": {"q_proj": 30}}),
}


@pytest.fixture(scope="module")
def base(checkpoints):
    return checkpoints("qwen2")  # qkv bias + tied embeddings: the most special-cased shape


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for i, (name, (r, alpha, targets, kw)) in enumerate(ADAPTERS.items()):
        out[name] = build_adapter(base, root / name, rank=r, alpha=alpha, targets=targets, seed=i + 1, **kw)
    return out


@pytest.fixture(scope="module")
def prompts(base):
    from loragate.engine.model.config import ModelConfig

    return random_prompts(14, ModelConfig.from_dir(base).vocab_size, seed=11)


@pytest.fixture(scope="module")
def plan(adapters):
    """Each prompt's adapter: every adapter twice, plus base-model requests."""
    names = list(adapters) * 2 + [None, None]
    return names


@pytest.fixture(scope="module")
def expected(base, adapters, prompts, plan):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = []
    cache = {}
    for prompt, name in zip(prompts, plan):
        if name not in cache:
            model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
            if name is not None:
                model = PeftModel.from_pretrained(model, str(adapters[name]))
            cache[name] = model.eval()
        out.append(hf_greedy(cache[name], prompt, 10))
    return out


def run(engine, prompts, plan, stagger: bool):
    reqs = [request(p, adapter=a, max_tokens=10, ignore_eos=True) for p, a in zip(prompts, plan)]
    arrivals = {2 * i if stagger else 0: [r] for i, r in enumerate(reqs)} if stagger else {0: reqs}
    return reqs, run_to_completion(engine, arrivals)


def test_mixed_batch_matches_peft_alone(base, adapters, prompts, plan, expected):
    engine = make_engine(base, adapters=tuple((n, str(p)) for n, p in adapters.items()), max_loras=8,
                         max_lora_rank=16)
    reqs, outs = run(engine, prompts, plan, stagger=False)
    for req, exp in zip(reqs, expected):
        assert tokens(outs[req.request_id]) == exp, req.adapter
    # the adapters really change the output, or the comparison above would prove little
    base_reqs, base_outs = run(engine, prompts, [None] * len(prompts), stagger=False)
    differ = sum(tokens(base_outs[b.request_id]) != tokens(outs[r.request_id])
                 for b, r in zip(base_reqs, reqs) if r.adapter)
    assert differ >= len(ADAPTERS)
    engine.shutdown()


def test_eviction_and_reload_mid_run_stay_exact(base, adapters, prompts, plan, expected):
    # two device slots for six adapters arriving over time: slots are recycled while others run
    engine = make_engine(base, adapters=tuple((n, str(p)) for n, p in adapters.items()), max_loras=2,
                         max_lora_rank=16, max_cpu_adapter_memory=1)
    reqs, outs = run(engine, prompts, plan, stagger=True)
    for req, exp in zip(reqs, expected):
        assert tokens(outs[req.request_id]) == exp, req.adapter
    loads = {s.name: s.load_count for s in engine.adapters.stats()}
    assert sum(loads.values()) > len(adapters)  # something was evicted and loaded again
    engine.shutdown()


def test_adapter_dir_dynamic_discovery_and_refusal(base, adapters, tmp_path):
    import shutil

    from loragate.engine.errors import AdapterNotFoundError

    engine = make_engine(base, adapter_dir=str(tmp_path), max_loras=2, max_lora_rank=16)
    with pytest.raises(AdapterNotFoundError):
        engine.add_request(request([5, 6, 7], adapter="late"))
    shutil.copytree(adapters["a-qv-r8"], tmp_path / "late")  # appears after start-up
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    ok = request([5, 6, 7], adapter="late", max_tokens=3)
    bad = request([5, 6, 7], adapter="broken", max_tokens=3)
    base_req = request([5, 6, 7], max_tokens=3)
    outs = run_to_completion(engine, {0: [ok, bad, base_req]})
    assert outs[ok.request_id][-1].finish_reason == "length"
    assert outs[bad.request_id][-1].finish_reason == "error"
    assert "adapter_config" in outs[bad.request_id][-1].error
    assert outs[base_req.request_id][-1].finish_reason == "length"
    engine.shutdown()
