"""Wanda (Sun et al. 2023): score |W_ij|·‖x_j‖₂, compared per output row."""

from __future__ import annotations

import torch

from fedprune.masks import Pattern, select_mask
from fedprune.pruners.base import PruneResult, register_pruner, require_stats
from fedprune.stat_kinds import SQ_NORM
from fedprune.stats import Stats


def wanda_scores(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """|W| · sqrt(Σx²) per input feature: ``(out, in)`` × ``(in,)`` -> ``(out, in)``, in at least float32
    (bfloat16 scores would tie far more often)."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    return weight.to(dtype).abs() * sq_norm.to(dtype).sqrt().reshape(1, -1)


@register_pruner
class WandaPruner:
    """Wanda: weights × activation norms, per-output comparison group."""

    name = "wanda"
    stat_kind = SQ_NORM.name
    patterns = ("unstructured", "nm", "structured")
    updates_weights = False
    group = "row"

    def scores(self, weight: torch.Tensor, stats: Stats | None) -> torch.Tensor:
        # The per-token mean and the sum give the same ranking within a row; use the mean for scale.
        return wanda_scores(weight, require_stats(self, stats).mean())

    def prune(
        self, weight: torch.Tensor, stats: Stats | None, sparsity: float, pattern: Pattern
    ) -> PruneResult:
        mask = select_mask(self.scores(weight, stats), sparsity, pattern, self.group)
        return PruneResult(weight=weight * mask, mask=mask)
