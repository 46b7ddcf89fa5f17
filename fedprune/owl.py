"""OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity"): a sparsity per decoder block from its
outlier ratio, the model's overall sparsity unchanged.

Steps, each its own function:

1. :func:`block_scores` — per prunable layer of a block, Wanda's score |W|·‖x‖ from the dense model's
   Σx² (the only data this needs: a sum, so a federation adds the sites' sums first and gets exactly the
   centralized ratios);
2. :func:`outlier_ratio` — the share of the block's scores above ``m`` times their mean;
3. :func:`owl_sparsities` — ratios mapped linearly onto ``[s − λ, s + λ]`` (the most outliers get the
   lowest sparsity), then shifted so that the weighted mean over blocks (weights: each block's prunable
   weights) is exactly ``s``, clipped to ``[0, MAX_SPARSITY]``;
4. :func:`block_allocation` — the per-layer :class:`~fedprune.allocation.Allocation` the pruning step reads.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedprune.allocation import Allocation, qualified
from fedprune.stats import Stats

logger = logging.getLogger(__name__)

MAX_SPARSITY = 0.99  # the largest sparsity OWL gives one block (clipping bound; sparsities are in [0, 1))


@dataclass(frozen=True)
class OwlSpec:
    """OWL's two parameters: outlier threshold ``m`` (times the block's mean score) and spread ``lam``."""

    m: float = 5.0
    lam: float = 0.08

    def __post_init__(self) -> None:
        if not self.m > 0:
            raise ValueError(f"owl.m must be > 0, got {self.m}")
        if not 0 <= self.lam < 0.5:
            raise ValueError(f"owl.lambda must be in [0, 0.5), got {self.lam}")


def block_scores(weights: Mapping[str, torch.Tensor], stats: Mapping[str, Stats]) -> list[torch.Tensor]:
    """Wanda's score |W|·sqrt(mean x²) of every layer of one block: ``(out, in)`` each, float32 or wider."""
    scores = []
    for name, weight in weights.items():
        sq_mean = stats[name].mean()  # (in,)
        dtype = torch.promote_types(weight.dtype, torch.float32)
        scores.append(weight.to(dtype).abs() * sq_mean.to(dtype).sqrt().reshape(1, -1))
    return scores


def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """The share of all of a block's scores (its layers together) above ``m`` times their mean."""
    flat = torch.cat([s.reshape(-1) for s in scores]).double()  # (weights in the block,)
    return float((flat > m * flat.mean()).double().mean())


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float, sizes: Sequence[int]) -> list[float]:
    """Per block, a sparsity in ``[0, MAX_SPARSITY]`` from its outlier ratio; ``sizes``: each block's
    prunable weights. The weighted mean Σ sizes·s_b / Σ sizes equals ``sparsity`` (to float rounding)."""
    if len(ratios) != len(sizes) or not ratios:
        raise ValueError(f"need one ratio per block: {len(ratios)} ratios, {len(sizes)} sizes")
    if not 0 <= sparsity <= MAX_SPARSITY:
        raise ValueError(f"OWL needs a sparsity in [0, {MAX_SPARSITY}], got {sparsity}")
    r = torch.tensor(ratios, dtype=torch.float64)
    n = torch.tensor(sizes, dtype=torch.float64)
    spread = r.max() - r.min()
    normalised = (r - r.min()) / spread if spread > 0 else torch.zeros_like(r)  # in [0, 1]
    raw = sparsity + lam - 2 * lam * normalised  # most outliers -> lowest sparsity
    return _clipped_with_mean(raw, n, sparsity).tolist()


def _clipped_with_mean(raw: torch.Tensor, weights: torch.Tensor, target: float) -> torch.Tensor:
    """``clip(raw + c, 0, MAX_SPARSITY)`` with the shift ``c`` for which the weighted mean is ``target``
    (found by bisection: the mean is continuous and non-decreasing in c)."""

    def mean(shift: float) -> float:
        return float((weights * (raw + shift).clamp(0.0, MAX_SPARSITY)).sum() / weights.sum())

    low, high = -1.0 - float(raw.max()), 1.0 - float(raw.min())  # mean(low) = 0, mean(high) = MAX
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if mean(middle) < target else (low, middle)
    return (raw + (low + high) / 2).clamp(0.0, MAX_SPARSITY)


def block_allocation(
    default: float, block_layers: Sequence[tuple[str, Sequence[str]]], sparsities: Sequence[float]
) -> Allocation:
    """An allocation giving every layer of block b (``block_layers[b]``: its prefix and layer names)
    the sparsity ``sparsities[b]``; ``default`` elsewhere."""
    per_layer = {
        qualified(prefix, name): float(s)
        for (prefix, names), s in zip(block_layers, sparsities, strict=True)
        for name in names
    }
    return Allocation(float(default), per_layer)
