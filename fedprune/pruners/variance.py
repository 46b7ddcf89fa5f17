"""Variance-based structured pruning: units ranked by the variance of their activations, the removed
units' mean activation folded into the consumer's bias (selection: :mod:`fedprune.structured.select`)."""

from __future__ import annotations

import torch

from fedprune.masks import Pattern
from fedprune.pruners.base import PruneResult, register_pruner
from fedprune.stat_kinds import MOMENTS
from fedprune.stats import Stats


@register_pruner
class VariancePruner:
    """Structured only (``pattern=structured``); ``weight_norm``: weigh each input's variance by the squared
    norm of its consumer column (the output variance it carries) rather than rank by variance alone."""

    name = "variance"
    stat_kind = MOMENTS.name
    patterns = ("structured",)
    updates_weights = True  # the consumer's bias changes

    def __init__(self, weight_norm: bool = True) -> None:
        self.weight_norm = bool(weight_norm)

    def scores(self, weight: torch.Tensor, stats: Stats | None) -> torch.Tensor:
        raise ValueError("pruner 'variance' scores whole units only: use pattern=structured")

    def prune(
        self, weight: torch.Tensor, stats: Stats | None, sparsity: float, pattern: Pattern
    ) -> PruneResult:
        raise ValueError("pruner 'variance' removes whole units only: use pattern=structured")
