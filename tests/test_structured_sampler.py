"""The grammar bitmask in the sampler: both unpacking paths agree with a per-bit loop, the mask is
applied before every other stage, and rows without a mask are untouched."""
from __future__ import annotations

import pytest
import torch

from loragate.engine.sampler import Sampler, SampleRow
from loragate.engine.sampling_params import SamplingParams
from loragate.engine.structured.bitmask import TokenBitmask, blocked_tokens, unpack_bitmask, unpack_numpy, unpack_torch


def random_bitmask(rows: int, vocab: int, seed: int = 0, density: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed int32 words, the bool matrix they encode)."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.rand(rows, vocab, generator=g) < density
    words = (vocab + 31) // 32
    packed = torch.zeros(rows, words, dtype=torch.int64)
    for t in range(vocab):
        packed[:, t // 32] |= allowed[:, t].long() << (t % 32)
    packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)
    return packed, allowed


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 100, 517])
def test_unpack_matches_bit_loop_on_both_paths(vocab):
    packed, allowed = random_bitmask(3, vocab, seed=vocab)
    assert torch.equal(unpack_numpy(packed, vocab), allowed)
    assert torch.equal(unpack_torch(packed, vocab, torch.device("cpu")), allowed)  # the path devices take
    assert torch.equal(unpack_bitmask(packed, vocab, torch.device("cpu")), allowed)
    if torch.cuda.is_available():
        assert torch.equal(unpack_bitmask(packed, vocab, torch.device("cuda")).cpu(), allowed)
    assert torch.equal(blocked_tokens(packed, vocab, torch.device("cpu")), ~allowed)
    # a logits row wider than the mask (padded lm_head): the extra columns are never allowed
    wide = unpack_bitmask(packed, 32 * packed.shape[1] + 5, torch.device("cpu"))
    assert not wide[:, vocab:].any() and torch.equal(wide[:, :vocab], allowed)
    assert torch.equal(blocked_tokens(packed, 32 * packed.shape[1] + 5, torch.device("cpu")), ~wide)


def test_mask_only_on_constrained_rows_and_before_bias_and_temperature():
    vocab = 64
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, vocab, generator=g)
    packed, allowed = random_bitmask(2, vocab, seed=2, density=0.1)
    mask = TokenBitmask([1, 3], packed)
    banned = int((~allowed[0]).nonzero()[0])
    rows = [
        SampleRow(SamplingParams(temperature=0.0), [], []),
        SampleRow(SamplingParams(temperature=0.0, logit_bias={banned: 100.0}), [], []),  # bias can't unmask
        SampleRow(SamplingParams(temperature=1.0, seed=3), [], [], torch.Generator().manual_seed(3)),
        SampleRow(SamplingParams(temperature=5.0, top_k=3, seed=4, logprobs=20), [], [],
                  torch.Generator().manual_seed(4)),
    ]
    sampler = Sampler(vocab)
    for _ in range(20):
        out = sampler(logits, rows, mask)
        assert allowed[0, out.token_ids[1]] and allowed[1, out.token_ids[3]]
        assert all(allowed[1, t] for t, _ in out.logprobs[3].top)  # alternatives come from the allowed set
        rows[2].generator.manual_seed(3)
        rows[3].generator.manual_seed(4)
    # the unconstrained rows get what they would get with no mask at all
    ref = sampler(logits[[0, 2]], [rows[0], rows[2]])
    rows[2].generator.manual_seed(3)
    got = sampler(logits, rows, mask)
    assert got.token_ids[0] == ref.token_ids[0] == int(logits[0].argmax())
    assert got.token_ids[2] == ref.token_ids[1]


def test_greedy_masked_rows_take_the_best_allowed_token():
    vocab = 200
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(5))
    packed, allowed = random_bitmask(3, vocab, seed=6, density=0.05)
    out = Sampler(vocab)(logits, [SampleRow(SamplingParams(temperature=0.0), [], []) for _ in range(3)],
                         TokenBitmask([0, 1, 2], packed))
    for r in range(3):
        expect = int(logits[r].masked_fill(~allowed[r], float("-inf")).argmax())
        assert out.token_ids[r] == expect
