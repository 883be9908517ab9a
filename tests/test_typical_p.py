"""typical_p (LoRAX/TGI's locally typical sampling) against transformers' TypicalLogitsWarper."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TypicalLogitsWarper

from loragate.engine.sampler import Sampler, SampleRow, filter_logits
from loragate.engine.sampling_params import SamplingParams


@pytest.mark.parametrize("mass", [0.2, 0.5, 0.9, 0.99])
def test_typical_matches_transformers(mass):
    g = torch.Generator().manual_seed(int(mass * 100))
    logits = torch.randn(6, 97, generator=g) * 3
    ours = filter_logits(logits, [0] * 6, [1.0] * 6, [0.0] * 6, [mass] * 6)
    ref = TypicalLogitsWarper(mass=mass)(None, logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    kept = ~torch.isinf(ref)
    assert torch.equal(ours[kept], logits[kept])
    assert bool((kept.sum(dim=1) < 97).any())  # the stage really removed something


def test_typical_mixed_rows_and_disabled_rows_untouched():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)) * 2
    ours = filter_logits(logits, [0] * 3, [1.0] * 3, [0.0] * 3, [1.0, 0.3, 1.0])
    assert torch.equal(ours[0], logits[0]) and torch.equal(ours[2], logits[2])
    ref = TypicalLogitsWarper(mass=0.3)(None, logits[1:2].clone())
    assert torch.equal(torch.isinf(ours[1:2]), torch.isinf(ref))


def test_sampled_tokens_stay_inside_the_typical_set():
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(2))
    allowed = ~torch.isinf(TypicalLogitsWarper(mass=0.6)(None, logits.clone()))[0]
    assert 1 < int(allowed.sum()) < 64
    sampler = Sampler(64, seed=0)
    params = SamplingParams(temperature=1.0, typical_p=0.6)
    seen = {sampler(logits.clone(), [SampleRow(params, [1], [])]).token_ids[0] for _ in range(200)}
    assert all(bool(allowed[t]) for t in seen) and len(seen) > 1


def test_typical_p_validation():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="typical_p"):
            SamplingParams(typical_p=bad).validate()
