"""Per-request adapter merging against PEFT's `add_weighted_adapter`: the same A/B weights and the
same greedy tokens, for every strategy the two share; DARE's pruning is seeded and reproducible."""
from __future__ import annotations

import pytest
import torch

from engine_utils import hf_greedy, make_engine, random_prompts, request, run_to_completion, tokens
from loragate.engine.adapters import load_peft_adapter
from loragate.engine.adapters.merge import MergeParams, merge_adapters, prune_random
from loragate.engine.adapters.virtual import merged_adapter
from loragate.testing import build_adapter

# name: (rank, alpha, targets, seed)
PARTS = {
    "m0": (4, 8, ("q_proj", "v_proj", "down_proj"), 1),
    "m1": (4, 4, ("q_proj", "v_proj", "down_proj"), 2),
    "m2": (4, 16, ("q_proj", "o_proj"), 3),  # different targets: left out (= zero) where it has none
}
CASES = [
    # (ids, weights, strategy, density, majority_sign_method)
    (["m0", "m1"], [0.7, 0.5], "linear", 1.0, "total"),
    (["m0", "m1", "m2"], [1.0, -0.5, 0.8], "linear", 1.0, "total"),
    (["m0", "m1", "m2"], [0.6, 0.9, 0.4], "ties", 0.5, "total"),
    (["m0", "m1"], [0.5, 1.2], "ties", 0.3, "frequency"),
    (["m0", "m1", "m2"], [0.8, 0.6, 0.5], "dare_linear", 0.6, "total"),
    (["m0", "m1"], [1.0, 0.7], "dare_ties", 0.5, "frequency"),
]
MAX_RANK = 16


@pytest.fixture(scope="module")
def parts(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-parts")
    return {n: build_adapter(base, root / n, rank=r, alpha=a, targets=t, seed=s) for n, (r, a, t, s) in PARTS.items()}


@pytest.fixture(scope="module")
def engine(base, parts):
    e = make_engine(base, adapters=tuple((n, str(p)) for n, p in parts.items()), max_lora_rank=MAX_RANK)
    yield e
    e.shutdown()


def shape_seeded_bernoulli(p, generator=None, **_):
    """A stand-in for torch.bernoulli whose mask depends only on the tensor's shape, so PEFT (which
    draws from the global RNG in its own order) and we draw the very same masks."""
    g = torch.Generator().manual_seed(hash(tuple(p.shape)) % (1 << 31))
    return (torch.rand(p.shape, generator=g) < p).to(p.dtype)


def peft_merge(base, parts, ids, weights, strategy, density, method, out_dir):
    """PEFT's merged adapter: its model (adapter active) and its saved directory."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(parts[ids[0]]), adapter_name=ids[0])
    for n in ids[1:]:
        model.load_adapter(str(parts[n]), adapter_name=n)
    kw = {} if strategy == "linear" else {"density": density, "majority_sign_method": method}
    model.add_weighted_adapter(ids, weights, "merged", combination_type=strategy, **kw)
    model.set_adapter("merged")
    model.save_pretrained(str(out_dir), selected_adapters=["merged"])
    return model, out_dir / "merged"


@pytest.mark.parametrize("case", CASES, ids=[f"{c[2]}-{len(c[0])}-{c[4]}" for c in CASES])
def test_weights_and_greedy_tokens_match_peft(case, base, parts, engine, tmp_path, monkeypatch):
    ids, weights, strategy, density, method = case
    if strategy.startswith("dare"):
        monkeypatch.setattr(torch, "bernoulli", shape_seeded_bernoulli)
    model, peft_dir = peft_merge(base, parts, ids, weights, strategy, density, method, tmp_path)
    loaded = [load_peft_adapter(parts[n], n, engine.base_info, MAX_RANK) for n in ids]
    ours = merge_adapters(loaded, weights, MergeParams(strategy, density, method), "x", torch.float32, MAX_RANK)

    # weights: PEFT's merged adapter has scale 1 (lora_alpha = r), like ours
    peft_loaded = load_peft_adapter(peft_dir, "peft", engine.base_info, MAX_RANK)
    assert peft_loaded.scale == ours.scale == 1.0
    assert set(peft_loaded.weights) == set(ours.weights)
    for key, (a, b) in peft_loaded.weights.items():
        torch.testing.assert_close(ours.weights[key][0], a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.weights[key][1], b, rtol=1e-5, atol=1e-6)

    # greedy tokens: our merge, served through the engine, == PEFT's merged model in transformers
    # (for DARE the loader thread builds it under the same shape-seeded masks: the patch is global)
    name = engine.registry.add_virtual(merged_adapter(ids, weights, strategy, density, method))
    prompts = random_prompts(3, engine.model_config.vocab_size, seed=len(ids) + 7)
    reqs = [request(p, adapter=name, max_tokens=8) for p in prompts]
    outs = run_to_completion(engine, {0: reqs})
    for p, r in zip(prompts, reqs):
        assert tokens(outs[r.request_id]) == hf_greedy(model, p, 8)


def test_merged_adapter_changes_output_and_is_built_once(engine, parts):
    """A merge is one more adapter: different tokens from its parts, built once for many requests,
    kept in the CPU tier and counted in its bytes."""
    name = engine.registry.add_virtual(merged_adapter(["m0", "m2"], [0.5, 0.5], "linear", None, None))
    prompt = random_prompts(1, engine.model_config.vocab_size, seed=3)[0]
    reqs = [request(prompt, adapter=a, max_tokens=8) for a in ("m0", "m2", name, name, name)]
    outs = run_to_completion(engine, {0: reqs})
    got = [tokens(outs[r.request_id]) for r in reqs]
    assert got[2] == got[3] == got[4] and got[2] not in (got[0], got[1])
    stats = {s.name: s for s in engine.adapters.stats()}
    assert stats[name].load_count == 1 and stats[name].requests_served == 3
    assert name in engine.adapters.cpu_names()


def test_merge_identity_and_digest(engine):
    a = merged_adapter(["m0", "m1"], [0.5, 0.5], "ties", 0.5, "total")
    assert a == merged_adapter(["m0", "m1"], [0.5, 0.5], "ties", 0.5, "total")
    others = [merged_adapter(["m1", "m0"], [0.5, 0.5], "ties", 0.5, "total"),
              merged_adapter(["m0", "m1"], [0.5, 0.6], "ties", 0.5, "total"),
              merged_adapter(["m0", "m1"], [0.5, 0.5], "ties", 0.4, "total"),
              merged_adapter(["m0", "m1"], [0.5, 0.5], "ties", 0.5, "frequency"),
              merged_adapter(["m0", "m1"], [0.5, 0.5], "dare_ties", 0.5, "total")]
    assert len({a.name, *(o.name for o in others)}) == 6
    from loragate.engine.adapters.virtual import build

    parts = {n: load_peft_adapter(engine.registry.resolve(n), n, engine.base_info, MAX_RANK) for n in ("m0", "m1")}
    built = [build(s, s.name, engine.base_info, MAX_RANK, parts.__getitem__) for s in (a, others[1])]
    assert built[0].digest and built[1].digest and built[0].digest != built[1].digest
    again = build(a, a.name, engine.base_info, MAX_RANK, parts.__getitem__)
    assert again.digest == built[0].digest


def test_dare_is_seeded_and_keeps_density_in_expectation():
    t = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    a = prune_random(t, 0.3, torch.Generator().manual_seed(5))
    b = prune_random(t, 0.3, torch.Generator().manual_seed(5))
    c = prune_random(t, 0.3, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    kept = a != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.02
    torch.testing.assert_close(a[kept], t[kept] / 0.3)


def test_dare_merge_is_reproducible(engine, parts):
    spec = merged_adapter(["m0", "m1"], [0.6, 0.6], "dare_ties", 0.4, "total")
    from loragate.engine.adapters.virtual import build

    loaded = {n: load_peft_adapter(parts[n], n, engine.base_info, MAX_RANK) for n in ("m0", "m1")}
    one = build(spec, spec.name, engine.base_info, MAX_RANK, loaded.__getitem__)
    two = build(spec, spec.name, engine.base_info, MAX_RANK, loaded.__getitem__)
    for key in one.weights:
        assert torch.equal(one.weights[key][0], two.weights[key][0])
        assert torch.equal(one.weights[key][1], two.weights[key][1])


@pytest.mark.parametrize("kwargs, field", [
    (dict(components=[], weights=[]), "ids"),
    (dict(components=["m0", "m1"], weights=[1.0]), "weights"),
    (dict(components=["m0"], weights=[1.0], strategy="svd"), "merge_strategy"),
    (dict(components=["m0"], weights=[1.0], strategy="ties", density=0.0), "density"),
    (dict(components=["m0"], weights=[1.0], strategy="dare_linear", density=1.5), "density"),
    (dict(components=["m0"], weights=[1.0], strategy="ties", majority_sign_method="mean"), "majority_sign_method"),
])
def test_merge_refusals_name_the_field(kwargs, field):
    kwargs = {"strategy": None, "density": None, "majority_sign_method": None, **kwargs}
    with pytest.raises(ValueError, match=field):
        merged_adapter(**kwargs)


def test_rank_above_max_after_padding_is_refused(engine, parts):
    loaded = [load_peft_adapter(parts[n], n, engine.base_info, MAX_RANK) for n in ("m0", "m1")]
    with pytest.raises(ValueError, match="exceeds max_lora_rank 2"):
        merge_adapters(loaded, [0.5, 0.5], MergeParams(), "x", torch.float32, 2)
