"""Checks that need a CUDA device (skipped elsewhere; run by scripts/gpu_check.sh on a GPU host):
compiled Triton kernels against the torch reference, and the engine on CUDA against the CPU."""
from __future__ import annotations

import random

import pytest
import torch

from loragate.kernels.layout import LoraBatchLayout
from loragate.kernels.lora_ref import add_lora_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("slices", [(576,), (576, 192, 192), (1536, 1536)])
def test_triton_add_lora_matches_reference_on_cuda(dtype, slices):
    from loragate.kernels.lora_triton import add_lora_triton

    rng = random.Random(0)
    L, R, in_dim = 8, 64, 576
    ranks = [rng.choice([1, 4, 8, 16, 64]) for _ in range(L)]
    token_slots = [rng.randrange(-1, L) for _ in range(40)] + [3] * 300 + [-1] * 7 + [5] * 2
    layout = LoraBatchLayout.from_token_slots(token_slots, ranks, [0.5] * L, "cuda")
    g = torch.Generator().manual_seed(1)
    A = (torch.randn(L, len(slices), R, in_dim, generator=g) / in_dim**0.5).to("cuda", dtype)
    B = (torch.randn(L, sum(slices), R, generator=g) / R**0.5).to("cuda", dtype)
    x = torch.randn(len(token_slots), in_dim, generator=g).to("cuda", dtype)
    y0 = torch.randn(len(token_slots), sum(slices), generator=g).to("cuda", dtype)
    offsets = [0]
    for n in slices:
        offsets.append(offsets[-1] + n)
    y_tri = y0.clone()
    ref = y0.float().clone()
    add_lora_ref(ref, x.float(), A.float(), B.float(), offsets, layout)
    add_lora_triton(y_tri, x, A, B, offsets, layout)
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(y_tri.float(), ref, atol=tol, rtol=tol)


def test_engine_on_cuda_matches_cpu(checkpoints, tmp_path):
    from engine_utils import make_engine, random_prompts, request, run_to_completion, tokens
    from loragate.testing import build_adapter

    base = checkpoints("llama3")
    ad = build_adapter(base, tmp_path / "a", rank=8, targets=("q_proj", "v_proj", "down_proj"), seed=3)
    prompts = random_prompts(6, 400, seed=5)
    results = {}
    for device in ("cpu", "cuda"):
        engine = make_engine(base, device=device, adapters=(("a", str(ad)),), max_loras=2, max_lora_rank=8)
        reqs = [request(p, adapter="a" if i % 2 else None, max_tokens=8, ignore_eos=True)
                for i, p in enumerate(prompts)]
        outs = run_to_completion(engine, {0: reqs})
        results[device] = [tokens(outs[r.request_id]) for r in reqs]
        engine.shutdown()
    assert results["cuda"] == results["cpu"]


def test_cuda_launches_compiled_kernels_even_with_TRITON_INTERPRET_set(monkeypatch):
    """The first GPU run's failure: another test module had set TRITON_INTERPRET=1, and CUDA
    launches in the same process went through the interpreter. The form now follows the device."""
    import triton.runtime.interpreter as interpreter

    from loragate.kernels import lora_triton

    def interpreted(*args, **kwargs):
        raise AssertionError("a CUDA launch went through Triton's interpreter")

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(interpreter.InterpretedFunction, "run", interpreted)
    layout = LoraBatchLayout.from_token_slots([0, 0, -1, 1], [4, 8], [1.0, 0.5], "cuda")
    g = torch.Generator().manual_seed(2)
    A = torch.randn(2, 1, 8, 64, generator=g).to("cuda", torch.bfloat16)
    B = torch.randn(2, 96, 8, generator=g).to("cuda", torch.bfloat16)
    x = torch.randn(4, 64, generator=g).to("cuda", torch.bfloat16)
    y = torch.zeros(4, 96, device="cuda", dtype=torch.bfloat16)
    ref = y.float().clone()
    add_lora_ref(ref, x.float(), A.float(), B.float(), [0, 96], layout)
    lora_triton.add_lora_triton(y, x, A, B, [0, 96], layout)
    torch.testing.assert_close(y.float(), ref, atol=5e-2, rtol=5e-2)


def test_self_check_passes_and_warms_on_cuda():
    from loragate.engine.kernel_check import check_kernels, warm_triton
    from loragate.engine.model.lora import LoraWeights, group_specs

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        report = check_kernels(torch.device("cuda"), dtype, "auto")
        assert report.results and all(r.ok for r in report.results), [r.cause for r in report.failures]
    lora = LoraWeights(group_specs(576, 576, 192, 1536), 2, 4, 16, torch.device("cuda"), torch.bfloat16,
                       groups=("qkv", "down"))
    launches, seconds = warm_triton(lora, ranks=[8])
    assert launches == 2 * 3  # two groups, three row-block sizes, one rank bucket
    assert all(torch.count_nonzero(b) == 0 for b in lora.B[0].values())


def test_prefix_caching_on_cuda_equals_off(checkpoints, tmp_path):
    from engine_utils import make_engine, random_prompts, request, run_to_completion, tokens
    from loragate.testing import build_adapter

    base = checkpoints("llama3")
    ads = {"a": build_adapter(base, tmp_path / "a", rank=8, targets=("q_proj", "v_proj"), seed=4),
           "b": build_adapter(base, tmp_path / "b", rank=4, targets=("o_proj", "down_proj"), seed=5)}
    system = random_prompts(1, 400, seed=9, lo=37, hi=38)[0]
    users = random_prompts(9, 400, seed=10, lo=3, hi=12)
    plan = [None, "a", "b"] * 3
    results = {}
    for on in (False, True):
        engine = make_engine(base, device="cuda", adapters=tuple((n, str(p)) for n, p in ads.items()), max_loras=2,
                             max_lora_rank=8, max_num_batched_tokens=16, enable_prefix_caching=on)
        reqs = [request(system + u, adapter=a, max_tokens=8, ignore_eos=True) for u, a in zip(users, plan)]
        outs = run_to_completion(engine, {0: reqs[:3], 2: reqs[3:6], 4: reqs[6:]})
        results[on] = [tokens(outs[r.request_id]) for r in reqs]
        assert (engine.stats().prefix_cache_hits > 0) == on
        assert engine.kv.allocator.num_used == 0
        engine.shutdown()
    assert results[True] == results[False]


def test_prompt_logprobs_on_cuda_match_cpu(checkpoints, tmp_path):
    """Prompt logprobs (LoRAX decoder_input_details) from the CUDA engine equal the CPU engine's, in a
    chunked prefill mixed with a request that does not ask (whose tokens stay the same)."""
    from engine_utils import make_engine, random_prompts, request, run_to_completion, tokens
    from loragate.testing import build_adapter

    base = checkpoints("llama3")
    ad = build_adapter(base, tmp_path / "a", rank=8, targets=("q_proj", "v_proj"), seed=6)
    long, short = random_prompts(2, 400, seed=11, lo=40, hi=41)
    results = {}
    for device in ("cpu", "cuda"):
        engine = make_engine(base, device=device, adapters=(("a", str(ad)),), max_loras=2, max_lora_rank=8,
                             max_num_batched_tokens=16)
        asking = request(long, adapter="a", max_tokens=4, prompt_logprobs=2)
        plain = request(short, max_tokens=4, ignore_eos=True)
        outs = run_to_completion(engine, {0: [asking, plain]})
        entries = next(o.prompt_logprobs for o in outs[asking.request_id] if o.prompt_logprobs is not None)
        results[device] = ([(e.token_id, e.logprob, [t for t, _ in e.top]) for e in entries[1:]],
                           tokens(outs[plain.request_id]))
        engine.shutdown()
    (cpu_lp, cpu_plain), (gpu_lp, gpu_plain) = results["cpu"], results["cuda"]
    assert gpu_plain == cpu_plain and len(gpu_lp) == len(cpu_lp) == len(long) - 1
    for (t1, lp1, _), (t2, lp2, _) in zip(cpu_lp, gpu_lp):
        assert t1 == t2 and lp1 == pytest.approx(lp2, abs=1e-3)
