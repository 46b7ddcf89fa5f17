"""The pruner interface and its registry."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch

from fedprune.masks import Pattern
from fedprune.stats import Stats

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneResult:
    """A pruned ``(out, in)`` weight and its keep-mask."""

    weight: torch.Tensor
    mask: torch.Tensor


class Pruner(Protocol):
    """Turns one layer's weight (and its calibration statistics) into a pruned weight and mask."""

    name: str
    stat_kind: str | None  # name of the statistic it needs (a STAT_KINDS key), None if data-free
    patterns: tuple[str, ...]  # "unstructured" and/or "nm"
    updates_weights: bool  # True if kept weights change (SparseGPT)

    def scores(self, weight: torch.Tensor, stats: Stats | None) -> torch.Tensor:
        """Importance of each weight, ``(out, in)``; higher is kept first."""

    def prune(
        self, weight: torch.Tensor, stats: Stats | None, sparsity: float, pattern: Pattern
    ) -> PruneResult:
        """Prune one layer without mutating ``weight``."""


class StructuredOnly:
    """Base of the pruners that remove whole units only (``pattern=structured``): their unit selection is
    in :mod:`fedprune.structured.select`; scoring or pruning single weights is an error."""

    name: str
    patterns = ("structured",)

    def scores(self, weight: torch.Tensor, stats: Stats | None) -> torch.Tensor:
        raise ValueError(f"pruner {self.name!r} removes whole units only: use pattern=structured")

    def prune(
        self, weight: torch.Tensor, stats: Stats | None, sparsity: float, pattern: Pattern
    ) -> PruneResult:
        raise ValueError(f"pruner {self.name!r} removes whole units only: use pattern=structured")


T = TypeVar("T")


class LastStatsCache(Generic[T]):
    """One value derived from the last Stats object seen (held weakly: dropped with it), so that layers
    sharing one input (q/k/v, gate/up share one Stats: collect_block_stats, decode_stats,
    aggregate_stats) factorise its matrix once."""

    def __init__(self) -> None:
        self._last: tuple[weakref.ref, T] | None = None

    def get(self, stats: Stats, compute: Callable[[Stats], T]) -> T:
        """The cached value for ``stats``, or ``compute(stats)`` (the old value freed first)."""
        last = self._last[0]() if self._last is not None else None
        if last is not stats:
            self._last = None
            self._last = (weakref.ref(stats, self._forget), compute(stats))
        return self._last[1]

    def _forget(self, _ref: weakref.ref) -> None:
        self._last = None


PRUNERS: dict[str, type] = {}


def register_pruner(cls: type) -> type:
    """Class decorator adding a pruner class to :data:`PRUNERS` under its ``name``."""
    if cls.name in PRUNERS:
        raise ValueError(f"pruner {cls.name!r} registered twice")
    PRUNERS[cls.name] = cls
    return cls


def get_pruner(name: str, **params: object) -> Pruner:
    """Instantiate a registered pruner with its parameters, with a clear error for unknown names."""
    if name not in PRUNERS:
        raise KeyError(f"unknown pruner {name!r}; known: {sorted(PRUNERS)}")
    return PRUNERS[name](**params)


def check_pruner_supports(pruner: Pruner, pattern: Pattern) -> None:
    """Raise ValueError if ``pruner`` cannot produce ``pattern``."""
    if pattern.kind not in pruner.patterns:
        raise ValueError(f"pruner {pruner.name!r} cannot produce pattern {pattern}")


def require_stats(pruner: Pruner, stats: Stats | None) -> Stats:
    """Return ``stats`` if of the kind the pruner needs, else raise ValueError."""
    if stats is None or stats.kind != pruner.stat_kind:
        got = None if stats is None else stats.kind
        raise ValueError(f"pruner {pruner.name!r} needs {pruner.stat_kind!r} statistics, got {got!r}")
    if stats.count <= 0:
        raise ValueError(f"pruner {pruner.name!r} got statistics over zero tokens")
    return stats
