"""Per-request adapter merging (LoRAX's `merged_adapters`): pure functions on LoRA A/B tensors.

A merge combines adapters 1..n with weights w_i into one new LoRA adapter that is then served like
any other (one device slot, batched with the rest). The math is PEFT's `add_weighted_adapter` for
the four strategies it shares with LoRAX, applied to A and B separately, module by module:

  Per module, adapter i contributes A_i [r_i, in] and B_i [out, r_i] with its scale s_i
  (lora_alpha / r, per-module ratios already folded into B by the loader), so its delta weight is
  s_i * B_i @ A_i. The weight and scale go half to each side, the sign to A only:
      a_i = sign(w_i s_i) * sqrt(|w_i s_i|)       b_i = sqrt(|w_i s_i|)
  and then, with X_i standing for A_i (weighted by a_i) or B_i (weighted by b_i):

  linear       X = sum_i c_i X_i
  ties         T_i = prune_magnitude(X_i, density)       (keep the int(density * numel) largest |x|)
               sign = +1 where sum_i T_i >= 0 else -1     ("total"; "frequency": sum_i sign(T_i))
               X = sum_i c_i T_i [sign(T_i) == sign] / max(1, #{i: sign(T_i) == sign})
  dare_linear  T_i = X_i * m_i / density, m_i ~ Bernoulli(density) elementwise; X = sum_i c_i T_i
  dare_ties    T_i as in dare_linear, then ties' sign election and disjoint mean

  The merged adapter has scale 1 (PEFT sets lora_alpha = r on the result): delta = B @ A.

Note that this is PEFT's "linear", not a weighted sum of delta weights: sum(b_i B_i) @ sum(a_i A_i)
has cross terms. That is what LoRAX and PEFT serve, so it is what users expect when they name it.

Differences from PEFT, each deliberate:
- Adapters that do not target a module are left out of that module's merge (PEFT does the same;
  for every strategy this equals merging a zero tensor, so the issue's "zero-filled" holds).
- Different ranks are allowed: each adapter's tensors are pruned at their own shape, then
  zero-padded to the largest rank (a zero row of A with a zero column of B changes nothing).
  PEFT refuses different ranks for these strategies, so there is nothing to disagree with.
- DARE's random masks come from a generator seeded by the caller (from the merge's
  specification), drawn per module in sorted order, A then B, adapter by adapter: the same merge
  request always builds the same adapter. PEFT uses the global RNG.
- Adapters whose per-module alpha/rank patterns differ from their global scale are merged with
  the ratio folded into B (the loader's form); PEFT would weigh such modules by their own scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loragate.engine.adapters.peft_loader import SUPPORTED_MODULES, LoadedAdapter

STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class MergeParams:
    """How to merge: the strategy and its knobs (density and sign method only where they apply)."""

    strategy: str = "linear"
    density: float = 1.0
    majority_sign_method: str = "total"
    seed: int = 0  # DARE's pruning

    def validate(self) -> None:
        """Raise ValueError naming the field."""
        if self.strategy not in STRATEGIES:
            raise ValueError(f"merge_strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.majority_sign_method not in SIGN_METHODS:
            raise ValueError(f"majority_sign_method must be one of {', '.join(SIGN_METHODS)}, "
                             f"got {self.majority_sign_method!r}")
        if self.strategy != "linear" and not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1] for merge_strategy {self.strategy!r}, got {self.density}")


def prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) entries of largest magnitude, zero the rest."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
    return t * mask.view(t.shape)


def prune_random(t: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: drop each entry with probability 1 - density and rescale the survivors by 1/density,
    so the expected value of every entry is unchanged."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


def majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """[n, ...] bool: where each task tensor agrees with the elected sign (zeros never agree)."""
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    elected = torch.where(magnitude >= 0, 1.0, -1.0).to(stacked.dtype)
    return sign == elected


def disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the task tensors that agree with the elected sign, entry by entry."""
    return (weighted * mask).sum(dim=0) / mask.sum(dim=0).clamp(min=1)


def merge_tensors(tensors: list[torch.Tensor], coeffs: list[float], params: MergeParams) -> torch.Tensor:
    """One side (all A's or all B's) of one module: already pruned float32 tensors of one shape ->
    the merged tensor. (Pruning is the caller's, at each tensor's own shape, before rank padding.)"""
    stacked = torch.stack(tensors, dim=0)
    c = torch.tensor(coeffs, dtype=stacked.dtype, device=stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
    if params.strategy in ("linear", "dare_linear"):
        return (stacked * c).sum(dim=0)
    mask = majority_sign_mask(stacked, params.majority_sign_method)
    return disjoint_merge(stacked * c, mask)


def _pruned(t: torch.Tensor, params: MergeParams, generator: torch.Generator) -> torch.Tensor:
    if params.strategy == "ties":
        return prune_magnitude(t, params.density)
    if params.strategy in ("dare_linear", "dare_ties"):
        return prune_random(t, params.density, generator)
    return t


def _pad_rank(t: torch.Tensor, side: int, rank: int) -> torch.Tensor:
    """Zero-pad A [r, in] with rows (side 0) or B [out, r] with columns (side 1) up to `rank`."""
    r = t.shape[0] if side == 0 else t.shape[1]
    if r == rank:
        return t
    if side == 0:
        return torch.cat([t, t.new_zeros(rank - r, t.shape[1])], dim=0)
    return torch.cat([t, t.new_zeros(t.shape[0], rank - r)], dim=1)


def merge_adapters(adapters: list[LoadedAdapter], weights: list[float], params: MergeParams, name: str,
                   dtype: torch.dtype, max_rank: int, digest: str = "") -> LoadedAdapter:
    """Merge loaded adapters into a new `LoadedAdapter` (scale 1) in `dtype`. Raises ValueError when
    the inputs cannot be merged (lengths differ, nothing to merge, rank above `max_rank`)."""
    params.validate()
    if not adapters:
        raise ValueError("merged_adapters.ids must name at least one adapter")
    if len(adapters) != len(weights):
        raise ValueError(f"merged_adapters has {len(adapters)} ids but {len(weights)} weights")
    if any(not math.isfinite(w) for w in weights):
        raise ValueError("merged_adapters.weights must be finite numbers")
    generator = torch.Generator().manual_seed(params.seed)
    modules = sorted({key for a in adapters for key in a.weights})
    merged: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    nbytes = 0
    for key in modules:
        members = [(a, w) for a, w in zip(adapters, weights) if key in a.weights]
        rank = max(a.weights[key][0].shape[0] for a, _ in members)
        if rank > max_rank:
            raise ValueError(f"merged adapter rank {rank} ({key[1]} of layer {key[0]}) exceeds max_lora_rank {max_rank}")
        coeff_a, coeff_b = [], []
        for a, w in members:
            ws = w * a.scale
            coeff_a.append(math.copysign(math.sqrt(abs(ws)), ws) if ws != 0 else 0.0)
            coeff_b.append(math.sqrt(abs(ws)))
        sides = []
        for side, coeffs in ((0, coeff_a), (1, coeff_b)):
            tensors = [_pad_rank(_pruned(a.weights[key][side].to(torch.float32), params, generator), side, rank)
                       for a, _ in members]
            sides.append(merge_tensors(tensors, coeffs, params).to(dtype).contiguous())
        merged[key] = (sides[0], sides[1])
        nbytes += sum(t.numel() * t.element_size() for t in sides)
    present = {m for (_, m) in merged}
    return LoadedAdapter(
        name=name,
        path="",
        rank=max(a.shape[0] for a, _ in merged.values()),
        scale=1.0,
        weights=merged,
        targets=tuple(m for m in SUPPORTED_MODULES if m in present),
        nbytes=nbytes,
        digest=digest,
    )
