"""Magnitude pruning: score |W|, one threshold per layer (data-free baseline)."""

from __future__ import annotations

import torch

from fedprune.masks import Pattern, select_mask
from fedprune.pruners.base import PruneResult, register_pruner
from fedprune.stats import Stats


@register_pruner
class MagnitudePruner:
    """Prune the smallest |W| per layer (unstructured) or per N:M group."""

    name = "magnitude"
    stat_kind = None
    patterns = ("unstructured", "nm", "structured")
    updates_weights = False
    group = "layer"

    def scores(self, weight: torch.Tensor, stats: Stats | None = None) -> torch.Tensor:
        return weight.abs()

    def prune(
        self, weight: torch.Tensor, stats: Stats | None, sparsity: float, pattern: Pattern
    ) -> PruneResult:
        mask = select_mask(self.scores(weight, stats), sparsity, pattern, self.group)
        return PruneResult(weight=weight * mask, mask=mask)
