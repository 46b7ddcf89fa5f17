"""Calibration statistics as sums with counts.

Every statistic is a float64 sum over tokens plus the token count, so two sets of statistics for the
same layer add up exactly: ``add_stats(stats(A), stats(B)) == stats(A ∪ B)``. Per-window partial sums
are computed in the activations' dtype and summed across windows in float64, which makes the result
independent (to float64 rounding) of how windows are grouped into batches or split across clients.

Kinds (objects in :mod:`fedprune.stat_kinds`, named by ``Stats.kind``)
----------------------------------------------------------------------
``sq_norm``: Σ_t x_tj², shape ``(in_features,)`` (Wanda's squared activation norms).
``hessian``: Σ_t x_t x_tᵀ, shape ``(in_features, in_features)`` (SparseGPT/OBS; H = 2·Σ/count).

A block's statistics are a :class:`BlockStats`: by layer name, with the groups of layers that share one
input (q/k/v, gate/up) sharing one :class:`Stats` object.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from fedprune.stat_kinds import (  # noqa: F401  (GRAM_TILE, gram_sum, sq_norm_sum: public here too)
    GRAM_TILE,
    STAT_KINDS,
    StatKind,
    get_stat_kind,
    gram_sum,
    sq_norm_sum,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stats:
    """A summed statistic of one layer's inputs and the number of tokens it sums over."""

    kind: str  # a name in fedprune.stat_kinds.STAT_KINDS
    total: torch.Tensor  # float64
    count: int

    def mean(self) -> torch.Tensor:
        """The per-token average (``total / count``)."""
        if self.count <= 0:
            raise ValueError("statistics over zero tokens have no mean")
        return self.total / self.count


STAT_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    name: kind.compute for name, kind in STAT_KINDS.items()
}


def token_count(x: torch.Tensor) -> int:
    """Number of tokens in a batch of layer inputs ``(..., in)``."""
    return x.numel() // x.shape[-1]


def batch_stats(kind: str | StatKind, x: torch.Tensor) -> Stats:
    """Statistics of one batch of layer inputs."""
    spec = get_stat_kind(kind)
    return Stats(kind=spec.name, total=spec.compute(x), count=token_count(x))


def empty_stats(kind: str | StatKind, in_features: int) -> Stats:
    """Zero statistics of the given kind."""
    spec = get_stat_kind(kind)
    return Stats(kind=spec.name, total=torch.zeros(spec.shape(in_features), dtype=torch.float64), count=0)


def add_stats(a: Stats, b: Stats) -> Stats:
    """Sum of two statistics of the same kind and layer."""
    if a.kind != b.kind or a.total.shape != b.total.shape:
        raise ValueError(f"cannot add {a.kind}{tuple(a.total.shape)} and {b.kind}{tuple(b.total.shape)}")
    return Stats(kind=a.kind, total=a.total + b.total, count=a.count + b.count)


def sum_stats(parts: list[Stats]) -> Stats:
    """Sum of a non-empty list of statistics."""
    if not parts:
        raise ValueError("no statistics to sum")
    total = parts[0]
    for part in parts[1:]:
        total = add_stats(total, part)
    return total


Group = tuple[str, ...]  # names of layers fed one input tensor, sorted


class BlockStats(Mapping[str, Stats]):
    """One block's statistics by layer name; the layers of a group (one shared input) share one Stats.

    ``groups`` are sorted tuples of layer names, ordered by their first name: walking the layers in
    sorted order, the i-th group is the i-th distinct entry met (the wire's slot order). Iteration
    follows ``order`` (default: sorted names).
    """

    def __init__(self, shared: Mapping[Group, Stats], order: Iterable[str] | None = None) -> None:
        items = sorted(((tuple(sorted(group)), stats) for group, stats in shared.items()), key=lambda i: i[0])
        if any(not group for group, _ in items):
            raise ValueError("a group of layers is empty")
        self._groups: list[Group] = [group for group, _ in items]
        self._group_stats: list[Stats] = [stats for _, stats in items]
        self._group_of: dict[str, int] = {name: i for i, group in enumerate(self._groups) for name in group}
        if len(self._group_of) != sum(len(group) for group in self._groups):
            raise ValueError(f"a layer is in two groups: {self._groups}")
        names = sorted(self._group_of) if order is None else list(order)
        if sorted(names) != sorted(self._group_of):
            raise ValueError(f"order {names} does not list the grouped layers {sorted(self._group_of)}")
        self._order = names

    @property
    def groups(self) -> list[Group]:
        """The groups of layers sharing one input, each sorted, ordered by first name."""
        return list(self._groups)

    @property
    def group_stats(self) -> list[Stats]:
        """One Stats per group, in :attr:`groups` order."""
        return list(self._group_stats)

    @property
    def index(self) -> list[int]:
        """Per layer in sorted name order, the position of its group in :attr:`groups`."""
        return [self._group_of[name] for name in sorted(self._group_of)]

    def group_of(self, name: str) -> Group:
        """The group of layer ``name`` (KeyError if the block has no such layer)."""
        return self._groups[self._group_of[name]]

    def __getitem__(self, name: str) -> Stats:
        return self._group_stats[self._group_of[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __repr__(self) -> str:
        return f"BlockStats({dict(zip(self._groups, self._group_stats, strict=True))!r})"


def as_block_stats(stats: Mapping[str, Stats]) -> BlockStats:
    """``stats`` as a :class:`BlockStats`: itself, or layers grouped by shared Stats object (identity)."""
    if isinstance(stats, BlockStats):
        return stats
    groups: dict[int, list[str]] = {}
    for name, value in stats.items():
        groups.setdefault(id(value), []).append(name)
    return BlockStats({tuple(names): stats[names[0]] for names in groups.values()}, order=stats)


def model_stats(per_block: Sequence[BlockStats]) -> BlockStats:
    """Every block's statistics as one mapping by ``"<block>.<layer>"`` (groups kept within each block)."""
    shared = {
        tuple(f"{index}.{name}" for name in group): stats
        for index, block in enumerate(per_block)
        for group, stats in zip(block.groups, block.group_stats, strict=True)
    }
    return BlockStats(
        shared, order=[f"{index}.{name}" for index, block in enumerate(per_block) for name in block]
    )


def split_model_stats(stats: Mapping[str, Stats], num_blocks: int) -> list[dict[str, Stats]]:
    """The inverse of :func:`model_stats`: by block, the statistics by layer name (shared objects kept)."""
    per_block: list[dict[str, Stats]] = [{} for _ in range(num_blocks)]
    for key in stats:
        index, name = key.split(".", 1)
        per_block[int(index)][name] = stats[key]
    return per_block


def common_groups(blocks: Sequence[BlockStats]) -> list[list[str]]:
    """Layers of ``blocks[0]`` grouped when they share one entry in every block (in its order)."""
    members: dict[tuple[Group, ...], list[str]] = {}
    for name in blocks[0]:
        members.setdefault(tuple(block.group_of(name) for block in blocks), []).append(name)
    return list(members.values())
