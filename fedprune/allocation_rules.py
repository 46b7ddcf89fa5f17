"""How a run decides each layer's sparsity (the ``allocation`` config key): a registry of rules.

A rule may need one statistic of the dense model's every block (``dense_stat_kind``: a sum, which a
federation adds up across sites before any block is pruned). Per block it gives a score from the
block's prunable weights and those statistics (:meth:`AllocationRule.block_score`, one block at a time,
so offloaded blocks need not be in memory together), then one sparsity per block from all scores
(:meth:`AllocationRule.sparsities`); :func:`allocated` makes the per-layer allocation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from fedprune.allocation import Allocation
from fedprune.owl import OwlSpec, block_allocation, block_scores, outlier_ratio, owl_sparsities
from fedprune.stat_kinds import SQ_NORM
from fedprune.stats import Stats

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Allocated:
    """A rule's result: the allocation, and per block its sparsity and score (empty for uniform)."""

    allocation: Allocation
    block_sparsity: list[float] = field(default_factory=list)
    block_score: list[float] = field(default_factory=list)


class AllocationRule(Protocol):
    name: str
    dense_stat_kind: str | None  # the statistic of every dense block it needs (None: none)

    def block_score(self, weights: Mapping[str, torch.Tensor], stats: Mapping[str, Stats]) -> float:
        """One block's score from its prunable weights ``(out, in)`` and dense statistics, by layer."""

    def sparsities(self, sparsity: float, scores: Sequence[float], sizes: Sequence[int]) -> list[float]:
        """One sparsity per block from all blocks' scores and prunable weight counts ``sizes``."""


@dataclass(frozen=True)
class UniformRule:
    """The same sparsity in every layer (no statistics)."""

    name = "uniform"
    dense_stat_kind = None

    @classmethod
    def from_owl(cls, owl: OwlSpec) -> UniformRule:
        return cls()

    def block_score(self, weights: Mapping[str, torch.Tensor], stats: Mapping[str, Stats]) -> float:
        return 0.0

    def sparsities(self, sparsity: float, scores: Sequence[float], sizes: Sequence[int]) -> list[float]:
        return [float(sparsity)] * len(scores)


@dataclass(frozen=True)
class OwlRule:
    """OWL: a sparsity per block from its outlier ratio (:mod:`fedprune.owl`), from the dense Σx²."""

    spec: OwlSpec = field(default_factory=OwlSpec)
    name = "owl"
    dense_stat_kind = SQ_NORM.name

    @classmethod
    def from_owl(cls, owl: OwlSpec) -> OwlRule:
        return cls(owl)

    def block_score(self, weights: Mapping[str, torch.Tensor], stats: Mapping[str, Stats]) -> float:
        return outlier_ratio(block_scores(weights, stats), self.spec.m)

    def sparsities(self, sparsity: float, scores: Sequence[float], sizes: Sequence[int]) -> list[float]:
        return owl_sparsities(scores, sparsity, self.spec.lam, sizes)


ALLOCATIONS: dict[str, type] = {"uniform": UniformRule, "owl": OwlRule}


def get_allocation_rule(name: str, owl: OwlSpec | None = None) -> AllocationRule:
    """The rule named ``name`` (KeyError naming the known ones); ``owl``: OWL's parameters."""
    if name not in ALLOCATIONS:
        raise KeyError(f"unknown allocation {name!r}; known: {sorted(ALLOCATIONS)}")
    return ALLOCATIONS[name].from_owl(owl or OwlSpec())


def allocated(
    rule: AllocationRule,
    sparsity: float,
    scores: Sequence[float],
    block_layers: Sequence[tuple[str, Mapping[str, int]]],
) -> Allocated:
    """The rule's allocation from every block's score and its prefix with weight counts by layer."""
    sizes = [sum(counts.values()) for _, counts in block_layers]
    sparsities = rule.sparsities(sparsity, scores, sizes)
    logger.info("%s block sparsities %s", rule.name, [round(s, 4) for s in sparsities])
    layers = [(prefix, list(counts)) for prefix, counts in block_layers]
    return Allocated(block_allocation(sparsity, layers, sparsities), list(sparsities), list(scores))
