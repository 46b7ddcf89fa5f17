"""Variance-based structured pruning: units ranked by the variance of their activations, the removed
units' mean activation folded into the consumer's bias (selection: :mod:`fedprune.structured.select`)."""

from __future__ import annotations

from fedprune.pruners.base import StructuredOnly, register_pruner
from fedprune.stat_kinds import MOMENTS


@register_pruner
class VariancePruner(StructuredOnly):
    """Structured only (``pattern=structured``); ``weight_norm``: weigh each input's variance by the squared
    norm of its consumer column (the output variance it carries) rather than rank by variance alone."""

    name = "variance"
    stat_kind = MOMENTS.name
    updates_weights = True  # the consumer's bias changes

    def __init__(self, weight_norm: bool = True) -> None:
        self.weight_norm = bool(weight_norm)
