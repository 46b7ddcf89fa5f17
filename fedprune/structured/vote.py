"""Structured voting (FedPrLLM on whole units): sites vote on the units they KEEP, not on single weights.

A site computes its own :class:`~fedprune.edits.StructuredEdit` of a block from its own statistics
(:meth:`Structure.edit`); :func:`unit_votes` reads back from the consumer's kept columns which units it
keeps: per coupling (``"ffn"``: FFN neurons, ``"heads"``: key/value groups; only those the structure
removes units from), a 0/1 int32 vector over the units (1 = kept). The server adds the sites' vectors
(in the clear or as a secure sum: they travel as ``(1, units)`` keep-masks, :func:`vote_masks` /
:func:`vote_shapes`, so both vote sums carry them unchanged), keeps per coupling the ``units - count``
units with the most votes (:func:`select_units`; ties: the lower unit id is kept) and builds the global
edit (:func:`voted_edit`): kept indices and the attention attributes only. The kept weights stay the
dense ones: a site's OBS update (``sparsegpt``) or mean compensation (``variance``) is its own and cannot
be voted, so the global block gets neither.

Depth pruning is voted alike: a site's own :class:`~fedprune.structured.decide.DepthPlan` (from its own
influence sums) becomes 1 bit per block and per attention sublayer, 1 = kept (:func:`depth_votes`, on the
wire ``depth.blocks`` / ``depth.attention``); the server removes the blocks with the fewest keep votes,
then the attention sublayers with the fewest among the blocks that stay (:func:`voted_depth_plan`; ties:
the lower index is kept, as in :func:`select_units`). ``pruner=gatenorm`` attention is not voted: every
party computes it from the dense weights.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fedprune.edits import StructuredEdit
from fedprune.models import find_prunable_layers, get_weight
from fedprune.structured.decide import (
    DEPTH_ATTENTION,
    DEPTH_BLOCKS,
    DepthPlan,
    Structure,
    check_dense,
    coupling_kept,
    head_attributes,
)

logger = logging.getLogger(__name__)


def voted_couplings(structure: Structure, attention: bool = True) -> list[str]:
    """The granularities voted on in a block: those the structure removes units from (no ``"heads"``
    in a block whose attention sublayer is removed, ``attention`` False)."""
    return [
        granularity
        for granularity, count in structure.counts().items()
        if count and (attention or granularity != "heads")
    ]


def kept_units(edit: StructuredEdit, structure: Structure, attention: bool = True) -> dict[str, torch.Tensor]:
    """Per voted coupling, the sorted ids of the units ``edit`` keeps, from its consumer's kept columns
    (a unit is kept when all of its columns are; an edit that keeps part of a unit, or not ``units -
    count`` units, is an error)."""
    out = {}
    for granularity in voted_couplings(structure, attention):
        coupling = structure.layout[granularity]
        consumer, count = coupling.consumer, structure.counts()[granularity]
        axis, columns = edit.kept.get(consumer, ("", None))
        if axis != "columns":
            raise ValueError(
                f"the edit keeps no columns of {consumer!r}, the consumer of the {granularity} units"
            )
        kept_column = torch.zeros(edit.shapes[consumer][1], dtype=torch.bool)
        kept_column[columns] = True
        unit_columns = coupling.columns[consumer]  # (units, width)
        per_unit = kept_column[unit_columns]
        whole = per_unit.all(dim=1)
        if not torch.equal(whole, per_unit.any(dim=1)) or int(kept_column.sum()) != int(per_unit.sum()):
            raise ValueError(f"the edit's kept columns of {consumer!r} are not whole {granularity} units")
        if int(whole.sum()) != coupling.units - count:
            raise ValueError(
                f"the edit keeps {int(whole.sum())} of {coupling.units} {granularity} units, "
                f"not {coupling.units - count}"
            )
        out[granularity] = whole.nonzero().reshape(-1)
    return out


def unit_votes(edit: StructuredEdit, structure: Structure, attention: bool = True) -> dict[str, torch.Tensor]:
    """One site's vote on one block: per voted coupling, ``(units,)`` int32, 1 for each kept unit
    (``attention`` False: the block's attention sublayer is removed, no heads voted)."""
    votes = {}
    for granularity, ids in kept_units(edit, structure, attention).items():
        vote = torch.zeros(structure.layout[granularity].units, dtype=torch.int32)
        vote[ids] = 1
        votes[granularity] = vote
    return votes


def vote_shapes(structure: Structure, prefix: str = "", attention: bool = True) -> dict[str, tuple[int, int]]:
    """The wire shapes of one block's unit votes, ``(1, units)`` by ``prefix + granularity``."""
    return {f"{prefix}{g}": (1, structure.layout[g].units) for g in voted_couplings(structure, attention)}


def abstention(structure: Structure, attention: bool = True) -> dict[str, torch.Tensor]:
    """A vote for no unit of a block, ``(units,)`` zeros per voted coupling: what a one-shot site sends
    for a block it removed itself (adding it changes no unit's rank)."""
    return {g: torch.zeros(structure.layout[g].units, dtype=torch.int32) for g in voted_couplings(structure, attention)}


def vote_masks(votes: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Unit votes as the ``(1, units)`` keep-masks of :func:`vote_shapes` (what a site sends)."""
    return {f"{prefix}{g}": vote.bool().reshape(1, -1) for g, vote in votes.items()}


def block_counts(counts: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The summed votes of one block by granularity, ``(units,)``, from counts keyed ``prefix + granularity``."""
    return {k[len(prefix) :]: v.reshape(-1) for k, v in counts.items() if k.startswith(prefix)}


def select_units(counts: torch.Tensor, num_remove: int) -> torch.Tensor:
    """Sorted ids of the ``units - num_remove`` units with the most votes ``(units,)``; between equal
    counts the lower unit id is kept (deterministic, independent of site order)."""
    units = counts.numel()
    if not 0 <= num_remove < units:
        raise ValueError(f"cannot remove {num_remove} of {units} units")
    order = torch.argsort(-counts.reshape(-1).to(torch.int64), stable=True)  # most votes first, then lower id
    return order[: units - num_remove].sort().values


def voted_edit(
    block: nn.Module, structure: Structure, counts: Mapping[str, torch.Tensor], attention: bool = True
) -> StructuredEdit:
    """The global edit of dense ``block`` (not modified) from the summed unit votes by granularity:
    kept indices and head attributes; no new weights or biases (``attention`` False: the block's
    attention sublayer is removed, its heads are not voted)."""
    layers = find_prunable_layers(block)
    kept, attributes = {}, {}
    for granularity in voted_couplings(structure, attention):
        coupling = structure.layout[granularity]
        if granularity not in counts or counts[granularity].numel() != coupling.units:
            raise ValueError(f"need {coupling.units} vote counts for the {granularity} units")
        check_dense(layers, coupling)
        units = select_units(counts[granularity], structure.counts()[granularity])
        kept.update(coupling_kept(coupling, units))
        if granularity == "heads":
            attributes.update(head_attributes(structure, int(units.numel())))
    shapes = {name: tuple(get_weight(layers[name]).shape) for name in kept}
    return StructuredEdit(kept, shapes, attributes=attributes)


# Depth votes: 1 bit per block and per attention sublayer, 1 = kept (as for units).

DEPTH_PREFIX = "depth."  # wire names "depth.blocks", "depth.attention"


def depth_vote_shapes(structure: Structure, pruner: object) -> dict[str, tuple[int, int]]:
    """The wire shapes of a site's depth vote, ``(1, blocks)`` for each depth choice made from data
    (:meth:`Structure.data_depth`; none for ``pruner=gatenorm`` attention: every party computes it)."""
    return {f"{DEPTH_PREFIX}{kind}": (1, structure.dense_blocks) for kind in structure.data_depth(pruner)}


def depth_votes(plan: DepthPlan, structure: Structure, pruner: object) -> dict[str, torch.Tensor]:
    """One site's depth vote from its own :class:`DepthPlan`: per data-made choice, ``(blocks,)`` int32,
    0 for each block (attention sublayer) the site removes, 1 otherwise (an attention sublayer of a block
    the site removes whole counts as kept: the site did not choose it)."""
    removed = {DEPTH_BLOCKS: plan.blocks, DEPTH_ATTENTION: plan.attention}
    votes = {}
    for kind in structure.data_depth(pruner):
        vote = torch.ones(structure.dense_blocks, dtype=torch.int32)
        vote[list(removed[kind])] = 0
        votes[kind] = vote
    return votes


def fewest_votes(counts: torch.Tensor, count: int, exclude: Sequence[int] = ()) -> list[int]:
    """The ``count`` entries (blocks) not in ``exclude`` with the fewest keep votes, sorted; between equal
    counts the lower index is kept, as in :func:`select_units` (deterministic, independent of site order)."""
    candidates = [i for i in range(counts.numel()) if i not in set(exclude)]
    if not 0 <= count <= len(candidates):
        raise ValueError(f"cannot remove {count} of {len(candidates)} candidates")
    votes = counts.reshape(-1)[candidates].to(torch.int64)
    order = torch.argsort(-votes, stable=True).tolist()  # most votes first, then lower index
    return sorted(candidates[i] for i in order[len(candidates) - count :])


def voted_depth_plan(
    structure: Structure, counts: Mapping[str, torch.Tensor], model: nn.Module, pruner: object
) -> DepthPlan:
    """The global :class:`DepthPlan` from the summed depth votes by kind (``(blocks,)`` keep counts):
    the ``structure.blocks`` blocks with the fewest keep votes, then the ``structure.attention``
    attention sublayers with the fewest among the blocks that stay (``pruner=gatenorm``: from the dense
    weights of ``model``, as every party computes it)."""
    for kind in structure.data_depth(pruner):
        if kind not in counts or counts[kind].numel() != structure.dense_blocks:
            raise ValueError(f"need {structure.dense_blocks} depth vote counts for {kind!r}")
    return structure.choose_depth(lambda kind, n, exclude: fewest_votes(counts[kind], n, exclude), model, pruner)
