"""Structured OBS with a refitted bias (``pattern=structured`` only): units removed greedily by the added
error of the best affine reconstruction of the consumer's output, the remaining columns and the bias
refitted (selection: :func:`fedprune.structured.select.affine_obs_units`)."""

from __future__ import annotations

from fedprune.pruners.base import StructuredOnly, register_pruner
from fedprune.stat_kinds import AFFINE_HESSIAN


@register_pruner
class ObsPruner(StructuredOnly):
    """Dampening ``percdamp`` of the mean diagonal of the centred Gram matrix; ``select``: the units kept
    by greedy OBS error (``obs``) or by output variance (``variance``), the weights and bias refitted."""

    name = "obs"
    stat_kind = AFFINE_HESSIAN.name
    updates_weights = True

    def __init__(self, percdamp: float = 0.03, select: str = "obs") -> None:
        if select not in ("obs", "variance"):
            raise ValueError(f"obs: select must be 'obs' or 'variance', got {select!r}")
        self.percdamp = float(percdamp)
        self.select = select
