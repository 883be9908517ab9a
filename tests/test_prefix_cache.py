"""Automatic prefix caching: the block pool's bookkeeping on its own, then the engine with caching
on against caching off (fp32 greedy, mixed base + adapters sharing one system prompt, staggered,
chunked, under eviction and preemption, n = 3), isolation between adapters and the base model,
delete-and-re-register, abort, and fairness charging only computed prompt tokens."""
from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass, field

import pytest
import torch

from engine_utils import hf_greedy, make_engine, random_prompts, request, run_to_completion, tokens
from loragate.engine.outputs import EngineRequest
from loragate.engine.prefix_cache import BASE_IDENTITY, PrefixCache, PrefixState, adapter_identity
from loragate.engine.sampling_params import SamplingParams
from loragate.testing import build_adapter

BS = 4  # engine_utils' block size


# ---- the pool alone ------------------------------------------------------------------------------
@dataclass
class FakeSeq:
    """Just what the pool reads from a sequence."""

    tokens: list[int]
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    prefix: PrefixState = field(default_factory=PrefixState)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def token_slice(self, start: int, end: int) -> list[int]:
        return self.tokens[start:end]


def admit(pool: PrefixCache, seq: FakeSeq, identity: bytes) -> int:
    """Admit seq as the scheduler does, with blocks for all its tokens; returns blocks matched."""
    m = pool.match(seq, identity)
    pool.start(seq, identity, m)
    seq.block_table += pool.allocate(-(-seq.num_tokens // BS) - len(m.blocks))
    return len(m.blocks)


def run_seq(pool: PrefixCache, seq: FakeSeq, identity: bytes) -> int:
    """admit, then 'compute' every token and commit."""
    matched = admit(pool, seq, identity)
    seq.num_computed = seq.num_tokens
    pool.commit(seq)
    return matched


def test_blocks_are_shared_only_for_same_tokens_and_identity():
    pool = PrefixCache(64, BS)
    a, b = adapter_identity("digest-a"), adapter_identity("digest-b")
    toks = list(range(10, 31))  # 21 tokens: 5 full blocks
    first = FakeSeq(list(toks))
    assert run_seq(pool, first, a) == 0
    assert pool.num_cached == 5
    assert pool.match(FakeSeq(list(toks)), a).blocks == first.block_table[:5]
    assert pool.match(FakeSeq(list(toks)), b).blocks == []  # other adapter, same tokens
    assert pool.match(FakeSeq(list(toks)), BASE_IDENTITY).blocks == []  # the base model
    changed = list(toks)
    changed[9] = 999  # inside block 2
    assert pool.match(FakeSeq(changed), a).blocks == first.block_table[:2]
    assert pool.match(FakeSeq(toks[:12] + [7]), a).blocks == first.block_table[:3]
    pool.release(first)
    pool.check()
    assert pool.num_used == 0 and pool.num_cached == 5


def test_last_token_is_never_taken_from_the_cache():
    pool = PrefixCache(16, BS)
    run_seq(pool, FakeSeq(list(range(8))), BASE_IDENTITY)  # exactly two blocks
    assert pool.num_cached == 2
    assert len(pool.match(FakeSeq(list(range(8))), BASE_IDENTITY).blocks) == 1  # token 7 must run again
    assert len(pool.match(FakeSeq(list(range(9))), BASE_IDENTITY).blocks) == 2


def test_refcounts_lru_and_eviction_order():
    pool = PrefixCache(6, BS)
    one = FakeSeq(list(range(100, 112)))  # 3 blocks
    run_seq(pool, one, BASE_IDENTITY)
    two = FakeSeq(list(range(100, 108)) + [1, 2, 3, 4, 5])  # shares 2 blocks, then 2 of its own
    assert run_seq(pool, two, BASE_IDENTITY) == 2
    assert [pool.refcount(b) for b in one.block_table] == [2, 2, 1]
    one_table, two_table = list(one.block_table), list(two.block_table)
    pool.release(one)
    assert pool.num_used == 4 and pool.num_free == 2  # one's last block went to the LRU
    pool.release(two)
    pool.check()
    assert pool.num_free == 6 and pool.num_cached == 4  # two's last block was never full
    # allocations take empty blocks first, then the least recently freed cached ones: one's tail,
    # then two's tail, and the shared head last
    got = pool.allocate(4)
    assert got[2:] == [one_table[2], two_table[2]] and pool.evictions == 2
    assert pool.match(FakeSeq(list(range(100, 112))), BASE_IDENTITY).blocks == one_table[:2]
    pool.free(got)
    pool.check()


def test_a_memoised_match_follows_evictions_commits_and_promises():
    """match() memoises a sequence's cached run; evicting or caching a block must expire it, and
    a promise made after it (another admission) must still show as pending."""
    pool = PrefixCache(4, BS)
    first = FakeSeq(list(range(9)))
    run_seq(pool, first, BASE_IDENTITY)  # blocks 0-1 cached, 2 partial
    table = list(first.block_table)
    pool.release(first)
    waiting = FakeSeq(list(range(9)) + [50, 51, 52, 53])  # 13 tokens: 3 full blocks to look up
    assert pool.match(waiting, BASE_IDENTITY).blocks == table[:2]
    got = pool.allocate(4)  # takes the empty blocks, then evicts the two cached ones
    assert pool.evictions == 2
    assert pool.match(waiting, BASE_IDENTITY).blocks == []  # not the memoised, evicted run
    pool.free(got)
    twin = FakeSeq(list(waiting.tokens))
    admit(pool, twin, BASE_IDENTITY)  # promises the blocks waiting would look up next
    m = pool.match(waiting, BASE_IDENTITY)
    assert m.blocks == [] and m.pending
    twin.num_computed = 8
    pool.commit(twin)  # its first two blocks are now cached content
    assert pool.match(waiting, BASE_IDENTITY).blocks == twin.block_table[:2]
    pool.release(twin)
    pool.check()


def test_promised_blocks_are_pending_until_computed_or_withdrawn():
    pool = PrefixCache(16, BS)
    seq = FakeSeq(list(range(12)))
    admit(pool, seq, BASE_IDENTITY)
    m = pool.match(FakeSeq(list(range(12))), BASE_IDENTITY)
    assert m.blocks == [] and m.pending
    seq.num_computed = 5  # a chunk: block 0 is computed, block 1 half
    pool.commit(seq)
    m = pool.match(FakeSeq(list(range(12))), BASE_IDENTITY)
    assert m.blocks == seq.block_table[:1] and m.pending
    table = list(seq.block_table)
    pool.release(seq)  # preempted or aborted before the rest ran
    pool.check()
    m = pool.match(FakeSeq(list(range(12))), BASE_IDENTITY)
    assert m.blocks == table[:1] and not m.pending
    assert pool.num_cached == 1 and not pool._promised


def test_disabled_pool_is_a_plain_free_list():
    pool = PrefixCache(8, BS, enabled=False)
    seq = FakeSeq(list(range(12)))
    assert run_seq(pool, seq, BASE_IDENTITY) == 0
    pool.release(seq)
    assert pool.num_cached == 0 and pool.num_free == 8
    assert pool.match(FakeSeq(list(range(12))), BASE_IDENTITY).blocks == []
    pool.check()


# ---- the engine --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vocab(base):
    from loragate.engine.model.config import ModelConfig

    return ModelConfig.from_dir(base).vocab_size


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix-adapters")
    specs = {"a": (8, ("q_proj", "v_proj"), 20), "b": (4, ("k_proj", "o_proj", "down_proj"), 21),
             "c": (8, ("q_proj", "v_proj"), 22)}  # c: a's shape and config, other weights
    out = {n: build_adapter(base, root / n, rank=r, targets=t, seed=seed) for n, (r, t, seed) in specs.items()}
    out["a-twin"] = root / "a-twin"  # a's content under another name
    shutil.copytree(out["a"], out["a-twin"])
    return out


def engine_with(base, adapters, **kw):
    return make_engine(base, adapters=tuple((n, str(p)) for n, p in adapters.items()), max_loras=4,
                       max_lora_rank=8, **kw)


def block_bytes(base) -> int:
    from loragate.engine.kv_cache import KVCacheSpec
    from loragate.engine.model.config import ModelConfig

    mc = ModelConfig.from_dir(base)
    return KVCacheSpec(mc.num_layers, mc.num_kv_heads, mc.head_dim, BS, torch.float32).bytes_per_block()


def assert_all_released(engine) -> None:
    pool = engine.kv.allocator
    pool.check()
    assert pool.num_used == 0 and pool.num_free == pool.num_blocks
    assert all(pool.refcount(b) == 0 for b in range(pool.num_blocks))
    assert engine.stats().kv_blocks_used == 0


def shared_prefix_workload(vocab: int):
    """12 requests over base + 3 adapters, all starting with one 30-token system prompt, two of
    them with the very same whole prompt; arriving in four waves."""
    g = torch.Generator().manual_seed(7)
    system = torch.randint(3, vocab, (30,), generator=g).tolist()
    users = random_prompts(11, vocab, seed=8, lo=3, hi=11)
    users.append(list(users[1]))
    plan = [None, "a", "b", "c"] * 3
    plan[-1] = plan[1]  # the duplicate prompt runs on the same adapter
    return [(system + u, name) for u, name in zip(users, plan)]


def run_workload(engine, work, waves=(0, 2, 5, 9), **params):
    params.setdefault("max_tokens", 8)
    reqs = [request(p, adapter=a, ignore_eos=True, **params) for p, a in work]
    per = -(-len(reqs) // len(waves))
    arrivals = {w: reqs[i * per:(i + 1) * per] for i, w in enumerate(waves)}
    outs = run_to_completion(engine, arrivals)
    return [tokens(outs[r.request_id]) for r in reqs], [outs[r.request_id][-1].cached_tokens for r in reqs]


SCENARIOS = {
    "staggered": {},
    "chunked": {"max_num_batched_tokens": 10},
    "evict-preempt": {"kv_cache_memory": None},  # cpu_kv_cache_memory set below: 30 blocks
}


def test_adapter_digest_is_its_content_not_its_name(base, adapters, tmp_path):
    import json

    from loragate.engine.adapters.peft_loader import load_peft_adapter

    engine = engine_with(base, {})
    info = engine.base_info
    engine.shutdown()

    def digest(path, name="x"):
        return load_peft_adapter(path, name, info, 8).digest

    da = digest(adapters["a"], "a")
    assert len(da) == 64 and da == digest(adapters["a-twin"], "another-name") == digest(adapters["a"], "a")
    assert da != digest(adapters["c"], "a")  # same shape and config, other weights
    scaled = tmp_path / "a-alpha"
    shutil.copytree(adapters["a"], scaled)
    cfg = json.loads((scaled / "adapter_config.json").read_text())
    cfg["lora_alpha"] = cfg["lora_alpha"] * 2
    (scaled / "adapter_config.json").write_text(json.dumps(cfg))
    assert digest(scaled) != da  # same tensors, other scale


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_greedy_outputs_equal_with_and_without_caching(base, adapters, vocab, scenario):
    kw = dict(SCENARIOS[scenario])
    if scenario == "evict-preempt":
        kw["cpu_kv_cache_memory"] = 30 * block_bytes(base)
    work = shared_prefix_workload(vocab)
    results = {}
    for on in (False, True):
        engine = engine_with(base, adapters, enable_prefix_caching=on, **kw)
        starts = []
        orig = engine.scheduler.schedule

        def spy():
            out = orig()
            starts.extend((s.seq.request_id, s.seq.preemptions, s.seq.num_computed) for s in out.scheduled)
            return out

        engine.scheduler.schedule = spy
        results[on] = run_workload(engine, work)
        assert_all_released(engine)
        stats = engine.stats()
        engine.shutdown()
        if on:
            pool = engine.kv.allocator
            assert stats.prefix_cache_hits > 0 and stats.prefix_cache_queries == sum(len(p) for p, _ in work)
            assert stats.prefix_cache_hits == sum(results[True][1])
            assert stats.prefix_cache_blocks == pool.num_cached > 0
            if scenario == "evict-preempt":
                assert engine.scheduler.num_preemptions > 0 and pool.evictions > 0
                # a preempted sequence finds (some of) its own blocks again when it is recomputed
                first_after = {}
                for rid, preempted, start in starts:
                    if preempted:
                        first_after.setdefault((rid, preempted), start)
                assert any(start > 0 for start in first_after.values())
        else:
            assert stats.prefix_cache_hits == 0 and sum(results[False][1]) == 0
    assert results[True][0] == results[False][0]
    cached = results[True][1]
    assert all(c % BS == 0 for c in cached)
    if scenario != "evict-preempt":
        assert cached[0] == 0 and all(c >= 28 for c in cached[4:])  # the system prompt's 7 blocks


def test_batched_chunk_attention_keeps_greedy_outputs(base, adapters, vocab, monkeypatch):
    """The CPU batches short chunks over cached context (chunk_attention.py) in bf16 only; forced
    on here for float32, a burst of cached-prefix requests over base + adapters gives the very
    tokens it gives with caching off."""
    from loragate.engine.model import chunk_attention

    work = shared_prefix_workload(vocab)
    off_engine = engine_with(base, adapters, enable_prefix_caching=False)
    off = run_workload(off_engine, work, waves=(0, 3))
    off_engine.shutdown()
    monkeypatch.setattr(chunk_attention, "BATCHED_DTYPES", (torch.float32,))
    batched = []
    real = chunk_attention.attend_group
    monkeypatch.setattr(chunk_attention, "attend_group", lambda q, c, g, s, o: (batched.append(g.num_chunks),
                                                                               real(q, c, g, s, o)))
    engine = engine_with(base, adapters, enable_prefix_caching=True)
    on = run_workload(engine, work, waves=(0, 3))
    assert_all_released(engine)
    engine.shutdown()
    assert batched and max(batched) >= 3  # the second wave's cached-prefix chunks went in one call
    assert on[0] == off[0] and sum(on[1]) > 0


def test_n3_choices_share_the_prompt_blocks(base, adapters, vocab):
    prompt = random_prompts(1, vocab, seed=12, lo=30, hi=31)[0]  # 30 tokens: 7 full blocks
    results = {}
    for on in (False, True):
        engine = engine_with(base, adapters, enable_prefix_caching=on)
        reqs = [request(prompt, adapter="b", temperature=0.9, top_p=0.95, seed=100 + i, max_tokens=12,
                        ignore_eos=True, logprobs=2) for i in range(3)]  # as the gateway builds n=3
        outs = run_to_completion(engine, {0: reqs})
        results[on] = ([tokens(outs[r.request_id]) for r in reqs],
                       [[lp.logprob for o in outs[r.request_id] for lp in o.new_logprobs] for r in reqs],
                       [outs[r.request_id][-1].cached_tokens for r in reqs])
        assert_all_released(engine)
        engine.shutdown()
    assert results[True][0] == results[False][0]
    for on_lps, off_lps in zip(results[True][1], results[False][1]):
        assert on_lps == pytest.approx(off_lps, abs=1e-4)
    assert results[True][2] == [0, 28, 28]  # the first computes, the other two share its blocks
    assert len({tuple(t) for t in results[True][0]}) > 1  # the seeds really differ


def test_no_sharing_across_adapters_or_with_the_base(base, adapters, vocab):
    prompt = random_prompts(1, vocab, seed=13, lo=26, hi=27)[0]  # 26 tokens: 24 cacheable
    order = ["a", "b", None, "c", "a-twin", "a"]
    engine = engine_with(base, adapters, enable_prefix_caching=False)
    reqs = [request(prompt, adapter=name, max_tokens=6, ignore_eos=True) for name in order]
    outs = run_to_completion(engine, {0: reqs})
    expected = [tokens(outs[r.request_id]) for r in reqs]
    engine.shutdown()
    engine = engine_with(base, adapters)
    got = []
    for name in order:  # one after another: every earlier run's blocks are cached
        req = request(prompt, adapter=name, max_tokens=6, ignore_eos=True)
        outs = run_to_completion(engine, {0: [req]})[req.request_id]
        got.append((tokens(outs), outs[-1].cached_tokens))
    assert_all_released(engine)
    engine.shutdown()
    assert [t for t, _ in got] == expected
    # identical tokens never share across adapters or with the base; the same content does
    assert [c for _, c in got] == [0, 0, 0, 0, 24, 24]
    assert len({tuple(t) for t in expected[:4]}) == 4  # the four models really differ


def test_delete_and_reregister_under_the_same_name_uses_the_new_weights(base, adapters, vocab):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loragate.engine.async_engine import AsyncEngine
    from loragate.engine.config import EngineConfig

    prompt = random_prompts(1, vocab, seed=14, lo=27, hi=28)[0]
    root = adapters["a"].parent
    cfg = EngineConfig(model=str(base), dtype="float32", device="cpu", kv_cache_memory=8 << 20, block_size=BS,
                       max_loras=2, max_lora_rank=8, allowed_adapter_dirs=(str(root),))
    engine = AsyncEngine(cfg)

    async def generate(name: str):
        req = EngineRequest(f"r-{name}-{id(object())}", list(prompt),
                            SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), adapter=name)
        outs = [o async for o in engine.generate(req)]
        assert outs[-1].finish_reason == "length"
        return tokens(outs), outs[-1].cached_tokens

    async def main():
        engine.register_adapter("swap", str(adapters["a"]))
        first = await generate("swap")
        again = await generate("swap")
        await engine.unregister_adapter("swap")
        engine.register_adapter("swap", str(adapters["c"]))
        swapped = await generate("swap")
        return first, again, swapped

    engine.start_sync()
    try:
        first, again, swapped = asyncio.run(main())
        assert_all_released(engine.engine)
    finally:
        engine.shutdown_sync()
    assert first[1] == 0 and again == (first[0], 24)  # caching works for the name...
    assert swapped[1] == 0  # ...but never across its re-registration with other weights
    hf = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    expected = hf_greedy(PeftModel.from_pretrained(hf, str(adapters["c"])).eval(), prompt, 8)
    assert swapped[0] == expected != first[0]


def test_abort_and_completion_leave_every_block_free_or_cached(base, adapters, vocab):
    engine = engine_with(base, adapters, max_num_batched_tokens=24)
    work = shared_prefix_workload(vocab)
    reqs = [request(p, adapter=a, max_tokens=30, ignore_eos=True) for p, a in work]
    for r in reqs:
        engine.add_request(r)
    pool = engine.kv.allocator
    for _ in range(40):  # until some are mid-prefill, some decode on shared blocks, some wait
        engine.adapters.wait_idle(timeout=30)
        engine.step()
        seqs = list(engine.seqs.values())
        mid_prefill = [s for s in seqs if s.block_table and s.num_computed < len(s.prompt_ids)]
        decoding = [s for s in seqs if s.output_ids and any(pool.refcount(b) > 1 for b in s.block_table)]
        waiting = [s for s in seqs if not s.block_table]
        if mid_prefill and decoding and waiting:
            break
    assert mid_prefill and decoding and waiting
    for s in (mid_prefill[0], decoding[0], waiting[0]):  # the decoding one drops shared references
        assert engine.abort(s.request_id).finish_reason == "abort"
    engine.kv.allocator.check()
    aborted = {mid_prefill[0].request_id, decoding[0].request_id, waiting[0].request_id}
    for _ in range(2000):
        if not engine.has_work():
            break
        engine.adapters.wait_idle(timeout=30)
        engine.step()
    assert not engine.has_work() and not set(engine.seqs) - aborted
    assert_all_released(engine)
    assert engine.kv.allocator.num_cached > 0
    engine.shutdown()


def test_fairness_charges_only_the_prompt_tokens_computed(base, vocab):
    prompt = random_prompts(1, vocab, seed=15, lo=35, hi=36)[0]  # 35 tokens: 32 cacheable
    counters = {}
    for on in (False, True):
        engine = make_engine(base, enable_prefix_caching=on)
        seen = []
        for i in range(2):
            req = request(prompt, max_tokens=5, ignore_eos=True)
            req.tenant = "acme"
            outs = run_to_completion(engine, {0: [req]})[req.request_id]
            seen.append((engine.policy.counters()["acme"], outs[-1].cached_tokens))
        counters[on] = seen
        engine.shutdown()
    out_cost = 2.0 * 5
    assert counters[False] == [(35 + out_cost, 0), (2 * (35 + out_cost), 0)]
    assert counters[True] == [(35 + out_cost, 0), (35 + out_cost + 3 + out_cost, 32)]


def test_native_chunk_attention_in_bf16_agrees_with_the_torch_path(base, adapters, vocab, monkeypatch):
    """In bf16 on the CPU the chunks after cached prefixes go to the fused native kernel
    (kernels/chunk_attention.py) where it runs; through the batched torch path the same burst gives
    the first tokens (the ones the chunks' attention computes) with the same logprobs up to bf16
    noise, and the same token unless the two best were within that noise of each other. Later
    tokens are left out: once a near-tie of the random checkpoint breaks differently, the two runs
    follow different texts."""
    from loragate.kernels import chunk_attention as native_chunks
    from loragate.kernels import native

    if native_chunks.path() is None:
        pytest.skip("the native chunk kernel is unavailable here")
    monkeypatch.setenv(native.BACKEND_ENV, "native")  # the kernel on any path this host runs
    work = shared_prefix_workload(vocab)
    calls = []
    real = native_chunks.chunk_attention_native
    monkeypatch.setattr(native_chunks, "chunk_attention_native", lambda *a: calls.append(a[3].numel()) or real(*a))
    results = {}
    for kernel in (True, False):
        if not kernel:
            monkeypatch.setattr(native_chunks, "use_native", lambda dtype, device: False)
        engine = engine_with(base, adapters, dtype="bfloat16")
        calls.clear()  # the start-up self-check probed the kernel
        reqs = [request(p, adapter=a, ignore_eos=True, logprobs=2) for p, a in work]
        outs = run_to_completion(engine, {0: reqs[:4], 3: reqs[4:]})
        results[kernel] = [(outs[r.request_id][0].new_logprobs[0], outs[r.request_id][-1].cached_tokens) for r in reqs]
        assert_all_released(engine)
        engine.shutdown()
        if kernel:
            assert calls and max(calls) >= 3  # the second wave's chunks went in one native call
        else:
            assert not calls  # the torch run never called the kernel
    assert sum(cached for _, cached in results[True]) > 0
    for (first, cached), (ref, ref_cached) in zip(results[True], results[False]):
        assert cached == ref_cached
        assert first.top[0][1] == pytest.approx(ref.top[0][1], abs=0.05)  # the best token's logprob
        if first.token_id != ref.token_id:
            assert ref.top[0][1] - ref.top[1][1] < 0.05  # only a near-tie may break the other way
