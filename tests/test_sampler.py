"""The sampler against references: transformers' logits processors, plain torch and per-row loops."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from loragate.engine.sampler import (
    Sampler,
    SampleRow,
    apply_logit_bias,
    apply_penalties,
    filter_logits,
    first_argmax,
    make_generator,
)
from loragate.engine.sampling_params import SamplingParams
from loragate.kernels.native import BACKEND_ENV

from native_marks import CPU_KERNEL_BACKENDS

P_FLOOR = 1e-4  # loose enough that a correct sampler essentially never fails the chi-square test


def chisquare_pvalue(observed: np.ndarray, expected: np.ndarray) -> float:
    """Pearson's chi-square goodness-of-fit p-value. scipy is not in the venv; the chi-square
    survival function with k degrees of freedom is the regularised upper gamma Q(k/2, x/2)."""
    stat = float(((observed - expected) ** 2 / expected).sum())
    dof = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def row(prompt=(), output=(), seed=None, **kw) -> SampleRow:
    params = SamplingParams(seed=seed, **kw)
    params.validate()
    gen = make_generator(seed, "cpu") if seed is not None else None
    return SampleRow(params, list(prompt), list(output), gen)


def rand_logits(b: int, v: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * scale


# ---- greedy ---------------------------------------------------------------------------------
def test_greedy_equals_argmax_on_fast_and_slow_paths():
    logits = rand_logits(7, 97, 0)
    sampler = Sampler(97)
    fast = sampler(logits, [row(temperature=0.0) for _ in range(7)])
    assert fast.token_ids == logits.argmax(-1).tolist()
    assert fast.logprobs == [None] * 7
    # asking for logprobs leaves the fast path but must not change the choice
    slow = sampler(logits, [row(temperature=0.0, logprobs=2) for _ in range(7)])
    assert slow.token_ids == fast.token_ids


@pytest.mark.parametrize("cpu_kernels", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_first_argmax_is_torch_argmax_with_ties_and_non_finite_rows(dtype, cpu_kernels, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, cpu_kernels)
    logits = rand_logits(6, 49152, 7).to(dtype)
    top = logits.amax()
    logits[0, [4000, 17, 30000]] = top + 1  # a three-way tie: the first index wins
    logits[1, -1] = top + 1  # the last column
    logits[2, 0] = top + 1  # the first column
    logits[3, [5, 9]] = float("inf")  # +inf ties (the subtraction gives nan): fallback
    logits[4] = float("-inf")  # a row with nothing finite
    logits[4, 123] = 0.0
    expected = logits.float().argmax(-1).tolist()
    assert expected[0] == 17 and expected[1] == 49151 and expected[2] == 0 and expected[3] == 5
    assert first_argmax(logits) == expected
    assert first_argmax(logits[:3, :1000]) == logits[:3, :1000].float().argmax(-1).tolist()  # a strided view
    nan_row = logits.clone()
    nan_row[5, 11] = float("nan")
    assert first_argmax(nan_row) == nan_row.argmax(-1).tolist()
    # widths that leave a tail past the native kernel's 64-column chunks; a tie between an early
    # chunk and the tail; a NaN in the tail; a row of -inf only; a row that is all the same value
    odd = rand_logits(6, 1000 + 7, 8).to(dtype)
    high = odd.amax() + 1
    odd[0, [70, 1005]] = high
    odd[1, 1003] = float("nan")
    odd[2] = float("-inf")
    odd[3] = 1.0
    odd[4, [0, 1006]] = high
    assert first_argmax(odd) == odd.argmax(-1).tolist()


def test_top_k_one_and_tiny_top_p_equal_greedy():
    logits = rand_logits(8, 64, 1)
    expected = logits.argmax(-1).tolist()
    sampler = Sampler(64, seed=3)
    for _ in range(5):
        assert sampler(logits, [row(temperature=1.5, top_k=1) for _ in range(8)]).token_ids == expected
        assert sampler(logits, [row(temperature=1.5, top_p=1e-6) for _ in range(8)]).token_ids == expected
        assert sampler(logits, [row(temperature=1.5, min_p=1.0, seed=i) for i in range(8)]).token_ids == expected


def test_caller_logits_are_not_modified():
    logits = rand_logits(3, 32, 2)
    before = logits.clone()
    Sampler(32)(logits, [row(repetition_penalty=1.3, prompt=[1, 2], logit_bias={3: 5.0},
                             frequency_penalty=1.0, output=[4], logprobs=3) for _ in range(3)])
    assert torch.equal(logits, before)


# ---- seeds ----------------------------------------------------------------------------------
def _target_kwargs():
    return dict(temperature=0.8, top_k=40, top_p=0.95, repetition_penalty=1.1, frequency_penalty=0.3)


def test_seeded_row_reproducible_whatever_batch_mates_and_position():
    V, steps = 200, 20
    step_logits = [rand_logits(1, V, 100 + s, scale=1.0)[0] for s in range(steps)]

    alone = row(seed=1234, **_target_kwargs())
    alone_tokens = []
    sampler = Sampler(V, seed=0)
    for s in range(steps):
        tok = sampler(step_logits[s].unsqueeze(0), [alone]).token_ids[0]
        alone.output_ids.append(tok)
        alone_tokens.append(tok)

    target = row(seed=1234, **_target_kwargs())
    mates = [row(temperature=1.0), row(seed=99, temperature=1.2, top_p=0.5), row(temperature=0.7, min_p=0.1),
             row(temperature=0.0)]
    other = Sampler(V, seed=77)
    batched_tokens = []
    for s in range(steps):
        batch = list(mates)
        pos = s % (len(mates) + 1)
        batch.insert(pos, target)
        logits = rand_logits(len(batch), V, 500 + s, scale=1.0)
        logits[pos] = step_logits[s]
        out = other(logits, batch)
        for r, tok in zip(batch, out.token_ids):
            r.output_ids.append(tok)
        batched_tokens.append(out.token_ids[pos])
    assert batched_tokens == alone_tokens


def test_different_seeds_diverge():
    V = 500
    logits = torch.zeros(2, V)  # uniform: any two independent streams differ almost surely
    a, b = row(seed=1), row(seed=2)
    sampler = Sampler(V)
    toks = [sampler(logits, [a, b]).token_ids for _ in range(20)]
    assert [t[0] for t in toks] != [t[1] for t in toks]


def test_same_seed_in_two_rows_gives_same_tokens():
    logits = rand_logits(1, 300, 5, scale=0.5).repeat(2, 1)
    a, b = row(seed=42), row(seed=42)
    sampler = Sampler(300)
    for _ in range(10):
        t = sampler(logits, [a, b]).token_ids
        assert t[0] == t[1]


# ---- penalties and bias ---------------------------------------------------------------------
def test_repetition_penalty_matches_transformers():
    V = 50
    logits = rand_logits(4, V, 7)
    rows = [
        row(prompt=[1, 2, 2, 3], output=[4, 1], repetition_penalty=1.3),
        row(prompt=[10, 11], output=[], repetition_penalty=0.7),
        row(prompt=[5, 6, 7], output=[8], repetition_penalty=1.0),
        row(prompt=[0, V + 3, 49], output=[49, 49, 20], repetition_penalty=2.0),  # V+3: out of vocab
    ]
    ours = logits.clone()
    apply_penalties(ours, rows)
    for i, r in enumerate(rows):
        ids = torch.tensor([r.prompt_ids + r.output_ids])
        ref = RepetitionPenaltyLogitsProcessor(float(r.params.repetition_penalty))(ids, logits[i : i + 1].clone())
        torch.testing.assert_close(ours[i], ref[0])
    assert not torch.equal(ours, logits)


def test_presence_and_frequency_match_per_row_loop():
    V = 40
    logits = rand_logits(4, V, 8)
    rows = [
        row(prompt=[3, 3, 3], output=[1, 1, 2, 9, 1], frequency_penalty=0.5, presence_penalty=1.2),
        row(prompt=[1], output=[], frequency_penalty=2.0, presence_penalty=2.0),
        row(output=[5, 5, 6], frequency_penalty=-1.0, presence_penalty=0.0),
        row(output=[7, 7, V + 1], frequency_penalty=0.0, presence_penalty=-0.5),
    ]
    ours = logits.clone()
    apply_penalties(ours, rows)
    ref = logits.clone()
    for i, r in enumerate(rows):
        for tok in set(r.output_ids):
            if tok < V:
                count = r.output_ids.count(tok)
                ref[i, tok] -= r.params.frequency_penalty * count + r.params.presence_penalty
    torch.testing.assert_close(ours, ref)


def test_repetition_then_frequency_order():
    logits = rand_logits(1, 20, 9)
    r = row(prompt=[2], output=[3, 3], repetition_penalty=1.5, frequency_penalty=0.4)
    ours = logits.clone()
    apply_penalties(ours, [r])
    ids = torch.tensor([r.prompt_ids + r.output_ids])
    ref = RepetitionPenaltyLogitsProcessor(1.5)(ids, logits.clone())
    ref[0, 3] -= 0.8
    torch.testing.assert_close(ours, ref)


def test_logit_bias_matches_loop_and_ignores_out_of_vocab():
    V = 30
    logits = rand_logits(3, V, 10)
    rows = [row(logit_bias={0: 100.0, 5: -3.5}), row(), row(logit_bias={29: 1.0, V: 50.0, -1: 9.0})]
    ours = logits.clone()
    apply_logit_bias(ours, rows)
    ref = logits.clone()
    for i, r in enumerate(rows):
        for tok, b in r.params.logit_bias.items():
            if 0 <= tok < V:
                ref[i, tok] += b
    torch.testing.assert_close(ours, ref)
    # a +100 bias on greedy decides the token
    out = Sampler(V)(logits[:2], [row(temperature=0.0, logit_bias={17: 100.0}), row(temperature=0.0)])
    assert out.token_ids == [17, int(logits[1].argmax())]


# ---- truncation against transformers' warpers -----------------------------------------------
def _finite_equal(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    keep = torch.isfinite(ref)
    torch.testing.assert_close(ours[keep], ref[keep])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_k_matches_transformers(seed):
    V = 100
    logits = rand_logits(5, V, 20 + seed)
    ks = [1, 5, 37, 0, V + 10]
    ours = filter_logits(logits, ks, [1.0] * 5, [0.0] * 5)
    for i, k in enumerate(ks):
        ref = TopKLogitsWarper(k)(None, logits[i : i + 1]) if 0 < k else logits[i : i + 1]
        _finite_equal(ours[i], ref[0])
    assert torch.isfinite(ours[1]).sum() == 5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_p_matches_transformers(seed):
    V = 100
    logits = rand_logits(6, V, 30 + seed)
    ps = [0.05, 0.3, 0.5, 0.9, 0.999, 1.0]
    ours = filter_logits(logits, [0] * 6, ps, [0.0] * 6)
    for i, p in enumerate(ps):
        ref = TopPLogitsWarper(p)(None, logits[i : i + 1])
        _finite_equal(ours[i], ref[0])
    kept = torch.isfinite(ours).sum(-1)
    assert kept.min() >= 1 and kept[-1] == V and kept[0] < kept[3]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_min_p_matches_transformers(seed):
    V = 100
    logits = rand_logits(5, V, 40 + seed)
    mps = [0.0, 0.01, 0.1, 0.5, 1.0]
    ours = filter_logits(logits, [0] * 5, [1.0] * 5, mps)
    for i, m in enumerate(mps):
        ref = MinPLogitsWarper(m)(None, logits[i : i + 1]) if m > 0 else logits[i : i + 1]
        _finite_equal(ours[i], ref[0])


@pytest.mark.parametrize("seed", [0, 1])
def test_chained_truncation_matches_transformers_chain(seed):
    V = 128
    logits = rand_logits(6, V, 50 + seed)
    settings = [(0, 1.0, 0.0), (10, 0.8, 0.0), (50, 0.6, 0.05), (0, 0.7, 0.2), (3, 1.0, 0.5), (64, 0.95, 0.01)]
    ours = filter_logits(logits, [s[0] for s in settings], [s[1] for s in settings], [s[2] for s in settings])
    for i, (k, p, m) in enumerate(settings):
        ref = logits[i : i + 1]
        if k > 0:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1.0:
            ref = TopPLogitsWarper(p)(None, ref)
        if m > 0:
            ref = MinPLogitsWarper(m)(None, ref)
        _finite_equal(ours[i], ref[0])


# ---- distributions --------------------------------------------------------------------------
def _chi_square_p(tokens: list[int], probs: torch.Tensor) -> float:
    counts = np.bincount(np.asarray(tokens), minlength=probs.numel()).astype(float)
    expected = probs.double().numpy() * len(tokens)
    support = expected > 0
    assert counts[~support].sum() == 0, "sampled a token of probability zero"
    return chisquare_pvalue(counts[support], expected[support])


def test_temperature_sampling_matches_softmax_unseeded():
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0])
    T, n = 0.7, 20000
    sampler = Sampler(6, seed=11)
    out = sampler(logits.repeat(n, 1), [row(temperature=T) for _ in range(n)])
    assert _chi_square_p(out.token_ids, torch.softmax(logits / T, -1)) > P_FLOOR


def test_temperature_sampling_matches_softmax_seeded_rows():
    logits = torch.tensor([0.3, -0.2, 1.1, 0.0, 0.7])
    T, n = 1.3, 4000
    out = Sampler(5)(logits.repeat(n, 1), [row(temperature=T, seed=i) for i in range(n)])
    assert _chi_square_p(out.token_ids, torch.softmax(logits / T, -1)) > P_FLOOR


def test_top_k_sampling_distribution_is_renormalised_top_k():
    logits = torch.tensor([0.1, 1.5, -0.3, 1.2, 0.9, -2.0, 0.0, 1.0])
    n, T = 12000, 0.9
    out = Sampler(8, seed=5)(logits.repeat(n, 1), [row(temperature=T, top_k=3) for _ in range(n)])
    ref = TopKLogitsWarper(3)(None, (logits / T).unsqueeze(0))[0]
    assert _chi_square_p(out.token_ids, torch.softmax(ref, -1)) > P_FLOOR


def test_padded_vocab_columns_never_sampled():
    logits = torch.zeros(4000, 10)
    logits[:, 8:] = 50.0  # columns past vocab_size=8 would win everything if they were considered
    out = Sampler(8)(logits, [row(temperature=1.0) for _ in range(4000)])
    assert max(out.token_ids) < 8
    assert Sampler(8)(logits[:2], [row(temperature=0.0), row(temperature=0.0)]).token_ids != [8, 8]


# ---- logprobs -------------------------------------------------------------------------------
def test_logprobs_are_log_softmax_before_temperature_with_sorted_alternatives():
    V = 60
    logits = rand_logits(4, V, 60)
    rows = [row(temperature=0.5, top_k=5, logprobs=5), row(temperature=0.0, logprobs=0),
            row(temperature=1.0), row(temperature=1.0, seed=3, logprobs=20)]
    out = Sampler(V)(logits, rows)
    ref = torch.log_softmax(logits, -1)
    assert out.logprobs[2] is None
    for i in (0, 1, 3):
        lp = out.logprobs[i]
        assert lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(ref[i, lp.token_id].item(), abs=1e-5)
        want = rows[i].params.logprobs
        assert len(lp.top) == want
        vals = [v for _, v in lp.top]
        assert vals == sorted(vals, reverse=True)
        ref_top = torch.topk(ref[i], want)
        assert [t for t, _ in lp.top] == ref_top.indices.tolist()
        np.testing.assert_allclose(vals, ref_top.values.tolist(), atol=1e-5)
    assert out.token_ids[1] == int(logits[1].argmax())


def test_logprobs_reflect_penalties():
    V = 40
    logits = rand_logits(1, V, 61)
    r = row(temperature=0.0, prompt=[1, 2, 3], output=[4], repetition_penalty=1.4, logprobs=3)
    out = Sampler(V)(logits, [r])
    ids = torch.tensor([r.prompt_ids + r.output_ids])
    ref = torch.log_softmax(RepetitionPenaltyLogitsProcessor(1.4)(ids, logits.clone()), -1)[0]
    assert out.token_ids[0] == int(ref.argmax())
    assert out.logprobs[0].logprob == pytest.approx(ref.max().item(), abs=1e-5)
    assert [t for t, _ in out.logprobs[0].top] == torch.topk(ref, 3).indices.tolist()


# ---- dtypes ---------------------------------------------------------------------------------
def test_bf16_logits():
    V = 77
    logits = rand_logits(5, V, 70).to(torch.bfloat16)
    sampler = Sampler(V)
    greedy = sampler(logits, [row(temperature=0.0) for _ in range(5)])
    assert greedy.token_ids == logits.float().argmax(-1).tolist()
    rows = [row(temperature=0.8, top_p=0.9, logprobs=2, seed=i) for i in range(5)]
    out = sampler(logits, rows)
    ref = torch.log_softmax(logits.float(), -1)
    for i, lp in enumerate(out.logprobs):
        assert 0 <= out.token_ids[i] < V
        assert isinstance(lp.logprob, float)
        assert lp.logprob == pytest.approx(ref[i, out.token_ids[i]].item(), abs=1e-5)
    rows_again = [row(temperature=0.8, top_p=0.9, logprobs=2, seed=i) for i in range(5)]
    assert Sampler(V)(logits.float(), rows_again).token_ids == out.token_ids


def test_empty_batch_and_shape_mismatch():
    sampler = Sampler(10)
    assert sampler(torch.zeros(0, 10), []).token_ids == []
    with pytest.raises(ValueError):
        sampler(torch.zeros(2, 10), [row()])
