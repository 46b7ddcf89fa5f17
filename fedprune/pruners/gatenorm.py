"""Gate-Norm style attention-sublayer pruning from the weights alone (``pattern=structured
structured.attention=N``): the sublayers whose queries and keys couple least are removed
(scores: :func:`fedprune.structured.depth.gatenorm_scores`)."""

from __future__ import annotations

from fedprune.pruners.base import StructuredOnly, register_pruner


@register_pruner
class GateNormPruner(StructuredOnly):
    """Data-free; ranks whole attention sublayers only (FFN neurons and heads: use another pruner)."""

    name = "gatenorm"
    stat_kind = None
    updates_weights = False
