"""Which units of one coupling to keep, per method, from summed statistics of the consumer's input.

Each selector is one registered function ``(pruner, coupled, stats, num_remove) -> UnitChoice`` under
the pruner's name (:data:`SELECTORS`), so ``pruner=<name> pattern=structured`` finds it:

``magnitude``  L2 norm of each unit's weights (producer rows and consumer columns); data-free.
``wanda``      Σ over the unit's consumer columns c of ‖x_c‖ · Σ_i |W_ic| (Wanda-sp / FLAP style), from Σx².
``variance``   Σ over the unit's columns of Var(x_c) · ‖W_:c‖² (the output variance the unit carries), from
               Σx and Σx²; the removed units' mean activation is folded into the consumer's bias, so the
               block's expected output is unchanged.
``sparsegpt``  greedy structured OBS on the consumer from Σxxᵀ (:func:`fedprune.structured.obs.remove_groups`):
               units removed by least added output error, the remaining columns updated.
``obs``        the same on the centred Gram matrix (from Σ[x;1][x;1]ᵀ), then the bias refitted: the best
               affine reconstruction of the consumer's output from the kept units (variance's mean
               compensation and SparseGPT's update at once).

Every unit score is a sum of per-column terms, so all of them rank the same on pooled and on summed
federated statistics (the statistics are sums).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from fedprune.stats import Stats
from fedprune.structured.families import Coupling
from fedprune.structured.obs import GroupRemoval, refit_columns, remove_groups

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Coupled:
    """One coupling of one block with its dense weights ``(out, in)`` by layer and the consumer's bias."""

    coupling: Coupling
    weights: Mapping[str, torch.Tensor]
    consumer_bias: torch.Tensor | None = None

    @property
    def consumer_weight(self) -> torch.Tensor:
        return self.weights[self.coupling.consumer]

    @property
    def columns(self) -> torch.Tensor:
        """``(units, width)`` consumer input columns of each unit."""
        return self.coupling.columns[self.coupling.consumer]


@dataclass(frozen=True)
class UnitChoice:
    """The kept units (sorted) and, where the method changes them, the consumer's new dense-width weight
    ``(out, in)`` (removed columns zero) and new bias ``(out,)``."""

    kept: torch.Tensor
    consumer_weight: torch.Tensor | None = None
    consumer_bias: torch.Tensor | None = None


Selector = Callable[[object, Coupled, Mapping[str, Stats], int], UnitChoice]
SELECTORS: dict[str, Selector] = {}


def unit_selector(name: str) -> Callable[[Selector], Selector]:
    """Register a selector for ``pruner=<name> pattern=structured``."""

    def register(selector: Selector) -> Selector:
        if name in SELECTORS:
            raise ValueError(f"structured selector {name!r} registered twice")
        SELECTORS[name] = selector
        return selector

    return register


def get_selector(name: str) -> Selector:
    if name not in SELECTORS:
        raise KeyError(f"pruner {name!r} has no structured method; structured methods: {sorted(SELECTORS)}")
    return SELECTORS[name]


def keep_highest(scores: torch.Tensor, num_remove: int) -> torch.Tensor:
    """Sorted ids of all but the ``num_remove`` lowest ``scores`` (ties: the lower id is removed first)."""
    order = torch.argsort(scores, stable=True)  # ascending
    return order[num_remove:].sort().values


def column_sums(per_column: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``(units,)``: per unit, the sum of ``per_column`` ``(in,)`` over its columns ``(units, width)``."""
    return per_column[columns].sum(dim=1)


def _consumer_stats(coupled: Coupled, stats: Mapping[str, Stats]) -> Stats:
    name = coupled.coupling.consumer
    if name not in stats:
        raise ValueError(
            f"no statistics for {name!r}, the consumer of the {coupled.coupling.granularity} units"
        )
    if stats[name].count <= 0:
        raise ValueError(f"statistics of {name!r} sum over zero tokens")
    return stats[name]


@unit_selector("magnitude")
def magnitude_units(pruner, coupled: Coupled, stats: Mapping[str, Stats], num_remove: int) -> UnitChoice:
    """Keep the units of largest weight L2 norm (producer rows and consumer columns together)."""
    coupling = coupled.coupling
    squares = torch.zeros(coupling.units, dtype=torch.float64)
    for name, rows in coupling.rows.items():
        per_row = coupled.weights[name].double().pow(2).sum(dim=1)  # (out,)
        squares += column_sums(per_row, rows)
    per_column = coupled.consumer_weight.double().pow(2).sum(dim=0)  # (in,)
    squares += column_sums(per_column, coupled.columns)
    return UnitChoice(keep_highest(squares.sqrt(), num_remove))


@unit_selector("wanda")
def wanda_units(pruner, coupled: Coupled, stats: Mapping[str, Stats], num_remove: int) -> UnitChoice:
    """Keep the units of largest Σ_c ‖x_c‖ · Σ_i |W_ic| over their consumer columns."""
    sums = _consumer_stats(coupled, stats)
    norms = sums.mean().sqrt()  # (in,) RMS of each input feature
    per_column = coupled.consumer_weight.double().abs().sum(dim=0) * norms  # (in,)
    return UnitChoice(keep_highest(column_sums(per_column, coupled.columns), num_remove))


def means_and_variances(stats: Stats) -> tuple[torch.Tensor, torch.Tensor]:
    """Per input feature, the mean and the (population) variance from ``moments`` sums ``(2, in)``."""
    if stats.kind != "moments":
        raise ValueError(f"variance needs 'moments' statistics, got {stats.kind!r}")
    mean = stats.total[0] / stats.count
    variance = (stats.total[1] / stats.count - mean.pow(2)).clamp(min=0.0)
    return mean, variance


def mean_compensation(
    weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor, removed_columns: torch.Tensor
) -> torch.Tensor:
    """The consumer's bias once ``removed_columns`` are gone: ``b + W[:, removed] @ mean[removed]``, ``(out,)``
    (float64), so the expected output over the calibration tokens is unchanged."""
    base = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias.double()
    return base + weight.double()[:, removed_columns] @ mean[removed_columns]


@unit_selector("variance")
def variance_units(pruner, coupled: Coupled, stats: Mapping[str, Stats], num_remove: int) -> UnitChoice:
    """Keep the units carrying the most output variance; fold the removed units' means into the bias."""
    mean, variance = means_and_variances(_consumer_stats(coupled, stats))
    weight = coupled.consumer_weight
    per_column = variance
    if getattr(pruner, "weight_norm", True):
        per_column = variance * weight.double().pow(2).sum(dim=0)  # (in,) Var(x_c) · ‖W_:c‖²
    kept = keep_highest(column_sums(per_column, coupled.columns), num_remove)
    removed_units = torch.ones(coupled.coupling.units, dtype=torch.bool)
    removed_units[kept] = False
    removed_columns = coupled.columns[removed_units].reshape(-1)
    bias = mean_compensation(weight, coupled.consumer_bias, mean, removed_columns)
    return UnitChoice(kept, consumer_bias=bias.to(weight.dtype))


@unit_selector("sparsegpt")
def obs_units(pruner, coupled: Coupled, stats: Mapping[str, Stats], num_remove: int) -> UnitChoice:
    """Remove units greedily by structured OBS error on the consumer; update its remaining columns."""
    sums = _consumer_stats(coupled, stats)
    if sums.kind != "hessian":
        raise ValueError(f"structured sparsegpt needs 'hessian' statistics, got {sums.kind!r}")
    result = remove_groups(
        coupled.consumer_weight, sums.total, coupled.columns, num_remove, getattr(pruner, "percdamp", 0.01)
    )
    return UnitChoice(result.kept, consumer_weight=result.weight)


def centred(gram1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From Σ[x;1][x;1]ᵀ ``(in+1, in+1)``: the centred sum Σ(x−μ)(x−μ)ᵀ ``(in, in)`` and the mean μ ``(in,)``."""
    count, sums = gram1[-1, -1], gram1[:-1, -1]
    mean = sums / count
    return gram1[:-1, :-1] - torch.outer(sums, mean), mean


@unit_selector("obs")
def affine_obs_units(pruner, coupled: Coupled, stats: Mapping[str, Stats], num_remove: int) -> UnitChoice:
    """Structured OBS on the centred Gram matrix; the bias absorbs the removed and changed columns' mean
    contribution, ``b' = b + (W − W') μ``."""
    sums = _consumer_stats(coupled, stats)
    if sums.kind != "affine_hessian":
        raise ValueError(f"structured obs needs 'affine_hessian' statistics, got {sums.kind!r}")
    covariance, mean = centred(sums.total)
    weight = coupled.consumer_weight
    percdamp = getattr(pruner, "percdamp", 0.03)
    if getattr(pruner, "select", "obs") == "variance":  # keep the units of most output variance, then refit
        per_column = covariance.diagonal().clamp(min=0) * weight.double().pow(2).sum(dim=0)
        kept = keep_highest(column_sums(per_column, coupled.columns), num_remove)
        refit = refit_columns(weight, covariance, coupled.columns[kept].reshape(-1).sort().values, percdamp)
        result = GroupRemoval(kept, torch.empty(0, dtype=torch.int64), refit, float("nan"))
    else:
        result = remove_groups(weight, covariance, coupled.columns, num_remove, percdamp)
    base = (
        torch.zeros(weight.shape[0], dtype=torch.float64)
        if coupled.consumer_bias is None
        else coupled.consumer_bias.double()
    )
    bias = base + (weight.double() - result.weight.double()) @ mean
    return UnitChoice(result.kept, consumer_weight=result.weight, consumer_bias=bias.to(weight.dtype))
