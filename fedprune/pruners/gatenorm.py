"""Gate-Norm style attention-sublayer pruning from the weights alone (``pattern=structured
structured.attention=N``): the sublayers whose queries and keys couple least are removed
(scores: :func:`fedprune.structured.depth.gatenorm_scores`)."""

from __future__ import annotations

import torch

from fedprune.masks import Pattern
from fedprune.pruners.base import PruneResult, register_pruner
from fedprune.stats import Stats


@register_pruner
class GateNormPruner:
    """Data-free; ranks whole attention sublayers only (FFN neurons and heads: use another pruner)."""

    name = "gatenorm"
    stat_kind = None
    patterns = ("structured",)
    updates_weights = False

    def scores(self, weight: torch.Tensor, stats: Stats | None) -> torch.Tensor:
        raise ValueError("pruner 'gatenorm' ranks attention sublayers only: use pattern=structured")

    def prune(
        self, weight: torch.Tensor, stats: Stats | None, sparsity: float, pattern: Pattern
    ) -> PruneResult:
        raise ValueError("pruner 'gatenorm' ranks attention sublayers only: use pattern=structured")
