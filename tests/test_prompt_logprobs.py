"""Prompt-token logprobs (`SamplingParams.prompt_logprobs`) against transformers (and PEFT): every
prompt token's logprob is log_softmax of the reference's logits at the position before it, also
when the prompt is prefilled in chunks, mixed in a batch with requests that do not ask (whose
outputs stay exact), after a preemption mid-prefill, and when its prefix is already cached."""
from __future__ import annotations

import pytest
import torch

from engine_utils import hf_greedy, make_engine, random_prompts, request, run_to_completion, tokens
from loragate.engine.sampling_params import SamplingParams
from loragate.testing import build_adapter

ATOL = 1e-4


def hf_prompt_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, vocab]: row i is log_softmax of the logits predicting prompt[i + 1]."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[:-1]


def check(entries, prompt: list[int], ref: torch.Tensor, top: int) -> None:
    assert entries is not None and len(entries) == len(prompt)
    assert entries[0] is None
    for i, e in enumerate(entries[1:], start=1):
        assert e.token_id == prompt[i]
        assert e.logprob == pytest.approx(ref[i - 1, prompt[i]].item(), abs=ATOL)
        assert len(e.top) == top
        if top:
            vals, _ = ref[i - 1].topk(top)
            assert [v for _, v in e.top] == pytest.approx(vals.tolist(), abs=ATOL)
            for tid, v in e.top:
                assert v == pytest.approx(ref[i - 1, tid].item(), abs=ATOL)


def delivered(outs):
    """The prompt logprobs of one request's outputs: exactly one output carries them."""
    carrying = [o.prompt_logprobs for o in outs if o.prompt_logprobs is not None]
    assert len(carrying) == 1, f"{len(carrying)} outputs carried prompt logprobs"
    return carrying[0]


@pytest.fixture(scope="module")
def prompts(hf_model):
    return random_prompts(5, hf_model.config.vocab_size, seed=7, lo=5, hi=30)


def test_validation():
    for bad in (-1, 21):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad).validate()
    SamplingParams(prompt_logprobs=0).validate()


def test_chunked_prompt_in_a_mixed_batch_matches_transformers(base, hf_model, prompts):
    """A 50-token prompt over a 16-token step budget (four chunks), beside requests that do not
    ask: its entries equal transformers', theirs carry none and their tokens stay exact."""
    long_prompt = random_prompts(1, hf_model.config.vocab_size, seed=9, lo=50, hi=51)[0]
    engine = make_engine(base, max_num_batched_tokens=16)
    asks = [request(long_prompt, max_tokens=3, prompt_logprobs=0, ignore_eos=True),
            request(prompts[0], max_tokens=3, prompt_logprobs=4, ignore_eos=True)]
    plain = [request(p, max_tokens=6, ignore_eos=True) for p in prompts[1:]]
    outs = run_to_completion(engine, {0: [plain[0], asks[0], plain[1]], 2: [asks[1], *plain[2:]]})
    check(delivered(outs[asks[0].request_id]), long_prompt, hf_prompt_logprobs(hf_model, long_prompt), 0)
    check(delivered(outs[asks[1].request_id]), prompts[0], hf_prompt_logprobs(hf_model, prompts[0]), 4)
    for req, prompt in zip([*asks, *plain], [long_prompt, prompts[0], *prompts[1:]]):
        assert tokens(outs[req.request_id]) == hf_greedy(hf_model, prompt, req.params.max_tokens)
    for req in plain:
        assert all(o.prompt_logprobs is None for o in outs[req.request_id])
    assert engine.kv.allocator.num_used == 0


def test_one_token_prompt_and_one_output_token(base, hf_model):
    engine = make_engine(base)
    req = request([5], max_tokens=1, prompt_logprobs=2)
    outs = run_to_completion(engine, {0: [req]})
    assert delivered(outs[req.request_id]) == [None]
    req = request([5, 9, 11], max_tokens=1, prompt_logprobs=0)
    outs = run_to_completion(engine, {0: [req]})
    check(delivered(outs[req.request_id]), [5, 9, 11], hf_prompt_logprobs(hf_model, [5, 9, 11]), 0)


def test_preemption_mid_prefill_does_not_duplicate(base, hf_model):
    """Preempted after its first chunk, the request recomputes from the start: the entries it
    already has are not gathered twice and the rest still match."""
    prompt = random_prompts(1, hf_model.config.vocab_size, seed=12, lo=30, hi=31)[0]
    engine = make_engine(base, max_num_batched_tokens=8)
    req = request(prompt, max_tokens=2, prompt_logprobs=0, ignore_eos=True)
    engine.add_request(req)
    engine.step()
    seq = engine.seqs[req.request_id]
    assert 0 < len(seq.prompt_lp.entries) < len(prompt) - 1
    engine.scheduler._preempt(seq)  # as the scheduler does when blocks run out
    outs = []
    for _ in range(50):
        outs.extend(engine.step())
        if outs and outs[-1].finished:
            break
    assert outs[-1].finished and seq.preemptions == 1
    check(delivered(outs), prompt, hf_prompt_logprobs(hf_model, prompt), 0)
    assert tokens(outs) == hf_greedy(hf_model, prompt, 2)


def test_preemption_keeps_entries_exact(base, hf_model, prompts):
    """Under KV pressure (preemptions, some after the prompt was delivered): each entry once, the
    values and the tokens exact."""
    from test_engine import engine_block_bytes

    engine = make_engine(base, kv_cache_memory=None, cpu_kv_cache_memory=14 * engine_block_bytes(base))
    asks = [request(p, max_tokens=10, prompt_logprobs=1, ignore_eos=True) for p in prompts]
    outs = run_to_completion(engine, {0: asks[:3], 2: asks[3:]})
    assert engine.scheduler.num_preemptions > 0
    for req, prompt in zip(asks, prompts):
        got = outs[req.request_id]
        check(delivered(got), prompt, hf_prompt_logprobs(hf_model, prompt), 1)
        assert tokens(got) == hf_greedy(hf_model, prompt, 10)
    assert engine.kv.allocator.num_used == 0


def test_prefix_cache_skipped_for_asking_requests_only(base, hf_model, prompts):
    """A request that asks computes its whole prompt though its blocks are cached, and caches
    its own blocks for later requests that do not ask."""
    engine = make_engine(base)
    warm = request(prompts[0], max_tokens=2)
    run_to_completion(engine, {0: [warm]})
    ask = request(prompts[0], max_tokens=2, prompt_logprobs=0)
    got = run_to_completion(engine, {0: [ask]})[ask.request_id]
    assert got[-1].cached_tokens == 0
    check(delivered(got), prompts[0], hf_prompt_logprobs(hf_model, prompts[0]), 0)
    first = request(prompts[2], max_tokens=2, prompt_logprobs=0)
    assert run_to_completion(engine, {0: [first]})[first.request_id][-1].cached_tokens == 0
    later = request(prompts[2], max_tokens=2)
    got = run_to_completion(engine, {0: [later]})[later.request_id]
    assert got[-1].cached_tokens >= 4 and got[-1].prompt_logprobs is None
    assert tokens(got) == hf_greedy(hf_model, prompts[2], 2)


def test_adapter_matches_peft(checkpoints, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = checkpoints("qwen2")
    adapter = build_adapter(base, tmp_path / "ad", rank=8, alpha=16, seed=3)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                      str(adapter)).eval()
    base_model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    prompt = random_prompts(1, model.config.vocab_size, seed=4, lo=25, hi=26)[0]
    engine = make_engine(base, adapters=(("ad", str(adapter)),), max_loras=2, max_lora_rank=8,
                         max_num_batched_tokens=8)
    with_ad = request(prompt, adapter="ad", max_tokens=2, prompt_logprobs=2)
    without = request(prompt, max_tokens=2, prompt_logprobs=2)
    outs = run_to_completion(engine, {0: [with_ad, without]})
    ref = hf_prompt_logprobs(model, prompt)
    check(delivered(outs[with_ad.request_id]), prompt, ref, 2)
    check(delivered(outs[without.request_id]), prompt, hf_prompt_logprobs(base_model, prompt), 2)
    assert not torch.allclose(ref, hf_prompt_logprobs(base_model, prompt), atol=1e-3)  # the adapter matters
    engine.shutdown()
