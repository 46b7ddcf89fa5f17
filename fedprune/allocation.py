"""How much to remove where: a sparsity per layer instead of one float for the whole model.

An :class:`Allocation` has a default and per-layer overrides keyed by the layer's qualified name
(``"model.layers.3.mlp.down_proj"``). :func:`uniform` is today's behaviour (the same sparsity
everywhere); non-uniform recipes (OWL) build one from statistics. The pruning and voting steps ask it
for each layer's sparsity (``of``), so nothing else changes when the allocation does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from fedprune.masks import check_sparsity

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Allocation:
    """Sparsity per layer: ``per_layer[name]`` where given, else ``default``."""

    default: float
    per_layer: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_sparsity(self.default)
        for value in self.per_layer.values():
            check_sparsity(value)

    def of(self, layer: str) -> float:
        """The sparsity of the layer with qualified name ``layer``."""
        return float(self.per_layer.get(layer, self.default))


def uniform(sparsity: float) -> Allocation:
    """The same sparsity in every layer."""
    return Allocation(float(sparsity))


def as_allocation(value: float | Allocation) -> Allocation:
    """An allocation from a float (uniform) or an allocation."""
    return value if isinstance(value, Allocation) else uniform(value)


def qualified(block_prefix: str, name: str) -> str:
    """``"<block prefix>.<layer>"`` (the layer name alone without a prefix)."""
    return f"{block_prefix}.{name}" if block_prefix else name
