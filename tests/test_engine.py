"""The serving loop end to end on the CPU: continuous batching against transformers' generate,
preemption, chunked prefill, seeded sampling, abort and stop conditions."""
from __future__ import annotations

import pytest
import torch

from loragate.kernels.native import BACKEND_ENV

from native_marks import CPU_KERNEL_BACKENDS
from engine_utils import hf_greedy, make_engine, random_prompts, request, run_to_completion, tokens


@pytest.fixture(scope="module")
def prompts(hf_model):
    return random_prompts(8, hf_model.config.vocab_size, seed=3)


@pytest.fixture(scope="module")
def expected(hf_model, prompts):
    return [hf_greedy(hf_model, p, 12) for p in prompts]


def staggered(prompts, **params):
    """Prompts arriving two at a time at steps 0, 3, 6, 9."""
    reqs = [request(p, max_tokens=12, ignore_eos=True, **params) for p in prompts]
    return reqs, {3 * (i // 2): reqs[i - i % 2: i - i % 2 + 2] for i in range(0, len(reqs), 2)}


@pytest.mark.parametrize("cpu_kernels", CPU_KERNEL_BACKENDS)
def test_batched_greedy_equals_transformers_alone(base, prompts, expected, cpu_kernels, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, cpu_kernels)
    engine = make_engine(base)
    reqs, arrivals = staggered(prompts)
    outs = run_to_completion(engine, arrivals)
    for req, exp in zip(reqs, expected):
        assert tokens(outs[req.request_id]) == exp
        assert outs[req.request_id][-1].finish_reason == "length"
    assert engine.scheduler.num_preemptions == 0
    assert engine.kv.allocator.num_used == 0


def test_preemption_keeps_outputs_exact(base, prompts, expected):
    # 14 blocks of 4 tokens: far less than 8 sequences of up to ~50 tokens need at once
    engine = make_engine(base, kv_cache_memory=None, cpu_kv_cache_memory=14 * engine_block_bytes(base))
    reqs, arrivals = staggered(prompts)
    outs = run_to_completion(engine, arrivals)
    assert engine.scheduler.num_preemptions > 0
    for req, exp in zip(reqs, expected):
        assert tokens(outs[req.request_id]) == exp
    assert engine.kv.allocator.num_used == 0


def engine_block_bytes(base) -> int:
    from loragate.engine.kv_cache import KVCacheSpec
    from loragate.engine.model.config import ModelConfig

    mc = ModelConfig.from_dir(base)
    return KVCacheSpec(mc.num_layers, mc.num_kv_heads, mc.head_dim, 4, torch.float32).bytes_per_block()


def test_chunked_prefill_within_token_budget(base, prompts, expected):
    engine = make_engine(base, max_num_batched_tokens=7)
    reqs, arrivals = staggered(prompts)
    seen_max = 0
    orig = engine.scheduler.schedule

    def spy():
        out = orig()
        nonlocal seen_max
        seen_max = max(seen_max, out.num_tokens)
        return out

    engine.scheduler.schedule = spy
    outs = run_to_completion(engine, arrivals)
    assert seen_max <= 7
    for req, exp in zip(reqs, expected):
        assert tokens(outs[req.request_id]) == exp


def test_seeded_sampling_ignores_batch_mates(base, prompts):
    def run(with_mates: bool) -> list[int]:
        engine = make_engine(base)
        target = request(prompts[0], temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
        arrivals = {0: [target]}
        if with_mates:
            arrivals[0] = [request(prompts[1], temperature=1.0, max_tokens=6), target,
                           request(prompts[2], temperature=0.7, seed=5, max_tokens=10)]
            arrivals[2] = [request(prompts[3], temperature=1.0, max_tokens=4)]
        outs = run_to_completion(engine, arrivals)
        return tokens(outs[target.request_id])

    alone = run(False)
    assert run(True) == alone
    assert len(alone) == 10


def test_abort_returns_every_block(base, prompts):
    engine = make_engine(base)
    reqs = [request(p, max_tokens=50, ignore_eos=True) for p in prompts]
    for r in reqs:
        engine.add_request(r)
    for _ in range(3):
        engine.step()
    assert engine.kv.allocator.num_used > 0
    for r in reqs:
        out = engine.abort(r.request_id)
        assert out is not None and out.finish_reason == "abort"
    assert engine.kv.allocator.num_used == 0
    assert not engine.has_work()
    stats = engine.stats()
    assert stats.running == 0 and stats.waiting == 0 and stats.kv_blocks_used == 0


def test_stop_token_ids_and_max_tokens(base, prompts, expected):
    engine = make_engine(base)
    stop_tok = expected[0][3]
    first = expected[0].index(stop_tok)
    r1 = request(prompts[0], max_tokens=12, stop_token_ids=[stop_tok])
    r2 = request(prompts[1], max_tokens=5, ignore_eos=True)
    outs = run_to_completion(engine, {0: [r1, r2]})
    assert tokens(outs[r1.request_id]) == expected[0][: first + 1]
    assert outs[r1.request_id][-1].finish_reason == "stop"
    assert tokens(outs[r2.request_id]) == expected[1][:5]
    assert outs[r2.request_id][-1].finish_reason == "length"


def test_stop_string_truncates_text(base, prompts, expected):
    engine = make_engine(base)
    full = engine.tokenizer.decode(expected[2])
    stop = full[len(full) // 2: len(full) // 2 + 2]
    if not stop.strip():
        pytest.skip("degenerate random text")
    r = request(prompts[2], max_tokens=12, ignore_eos=True, stop=[stop])
    outs = run_to_completion(engine, {0: [r]})
    text = "".join(o.new_text for o in outs[r.request_id])
    assert outs[r.request_id][-1].finish_reason == "stop"
    assert text == full[: full.index(stop)]


def test_prompt_too_long_is_refused(base):
    from loragate.engine.errors import PromptTooLongError

    engine = make_engine(base, max_model_len=32)
    with pytest.raises(PromptTooLongError):
        engine.add_request(request(list(range(3, 30)), max_tokens=10))
    assert not engine.has_work()


def test_scheduler_keeps_queues_only_for_backlogged_clients(base, prompts):
    """Per-step scheduling scans the clients' queues: with thousands of tenants or adapters seen
    over a server's life, only those with something waiting may stay there."""
    from dataclasses import replace

    engine = make_engine(base)
    reqs = [replace(request(p, max_tokens=3), tenant=f"tenant-{i}") for i, p in enumerate(prompts)]
    for r in reqs:
        engine.add_request(r)
    assert len(engine.scheduler.queues) == len(reqs)
    engine.step()  # everyone fits: all admitted at once
    assert len(engine.scheduler.running) == len(reqs)
    assert engine.scheduler.queues == {}
