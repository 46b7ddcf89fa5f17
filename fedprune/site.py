"""A site's side of the layer-synchronous protocols: private block inputs kept between rounds.

The site keeps the inputs of the block it is about to be asked for, so that one round costs the same at
block 30 as at block 0. Per round it either reports statistics of the dense block (``stats_sync``) or its
own mask of the block (``mask_vote_sync``; with ``pattern=structured`` its vote on the block's units);
then it applies the globally pruned block and runs it once to get the next block's inputs. Nothing here ever leaves the site except what the caller encodes. Layers
matched by ``ignore`` patterns (:mod:`fedprune.models`) get no statistics and no mask.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedprune.allocation_rules import AllocationRule
from fedprune.masks import Pattern, parse_pattern
from fedprune.models import find_blocks, find_prunable_layers, get_weight
from fedprune.pruners.base import Pruner
from fedprune.sequential import (
    BlockAccess,
    BlockInputs,
    ResidentBlocks,
    capture_block_inputs,
    collect_block_stats,
    collect_dense_stats,
    collect_influence,
    prune_layers,
    prune_model_,
    run_block,
)
from fedprune.stats import BlockStats, model_stats
from fedprune.structured.decide import DepthPlan, Structure
from fedprune.structured.depth import INFLUENCE_ATTENTION, INFLUENCE_BLOCKS, Influence, remove_attention_
from fedprune.structured.families import family_of
from fedprune.structured.vote import abstention, depth_votes, unit_votes

logger = logging.getLogger(__name__)


@dataclass
class SiteState:
    """Inputs of block ``block`` for the site's calibration windows."""

    inputs: BlockInputs
    block: int
    tokens: int


def start_site(model: nn.Module, calib_ids: torch.Tensor, batch_size: int) -> SiteState:
    """Embed the site's windows: the inputs of block 0."""
    inputs = capture_block_inputs(model, calib_ids, batch_size)
    return SiteState(inputs=inputs, block=0, tokens=inputs.num_tokens)


def _check_block(state: SiteState, block: int) -> None:
    if state.block != block:
        raise ValueError(f"site holds the inputs of block {state.block}, was asked for block {block}")


def site_block_stats(
    model: nn.Module,
    state: SiteState,
    block: int,
    stat_kind: str,
    token_bound: float | None = None,
    ignore: Sequence[str] = (),
    without_attention: bool = False,
) -> BlockStats:
    """Summed statistics of every prunable, not ignored layer of dense ``block`` on the site's inputs
    (``token_bound``: clip each token's layer input to this L2 norm first, for differential privacy;
    ``without_attention``: of a copy of the block whose attention sublayer is removed)."""
    _check_block(state, block)
    blocks_name, blocks = find_blocks(model)
    prefix = f"{blocks_name}.{block}"
    module = blocks[block]
    if without_attention:
        module = copy.deepcopy(module)
        remove_attention_(module, family_of(model.config))
    return collect_block_stats(module, state.inputs, stat_kind, token_bound, ignore, prefix)


def _influence(model: nn.Module, state: SiteState) -> Influence:
    """The dense model's influence sums on the site's windows (state at block 0)."""
    _check_block(state, 0)
    return collect_influence(ResidentBlocks(model), state.inputs, family_of(model.config))


def site_influence(model: nn.Module, state: SiteState) -> BlockStats:
    """The dense model's influence sums on the site's windows (state at block 0): per block and per
    attention sublayer, Σ_t (1 − cos) (:mod:`fedprune.structured.depth`), as two ``sq_norm`` entries."""
    influence = _influence(model, state)
    return BlockStats({(INFLUENCE_BLOCKS,): influence.blocks, (INFLUENCE_ATTENTION,): influence.attention})


def site_dense_stats(
    model: nn.Module,
    state: SiteState,
    stat_kind: str,
    ignore: Sequence[str] = (),
    token_bound: float | None = None,
) -> BlockStats:
    """Statistics of every prunable layer of every dense block on the site's windows (state at block 0),
    by ``"<block>.<layer>"`` (for an allocation rule such as OWL; ``token_bound``: DP clip first)."""
    _check_block(state, 0)
    blocks_name = find_blocks(model)[0]
    per_block = collect_dense_stats(
        ResidentBlocks(model), state.inputs, stat_kind, ignore, blocks_name, token_bound
    )
    return model_stats(per_block)


def site_depth_votes(
    model: nn.Module, state: SiteState, pruner: Pruner, structure: Structure
) -> dict[str, torch.Tensor]:
    """The site's own depth vote (structured depth pruning in a voting protocol): the blocks and
    attention sublayers centralized pruning would remove on this site's windows alone (its influence
    sums, state at block 0), as 0/1 per block by kind (:func:`fedprune.structured.vote.depth_votes`)."""
    influence = _influence(model, state) if structure.needs_influence(pruner) else None
    return depth_votes(structure.depth_plan(influence, model, pruner), structure, pruner)


def site_block_masks(
    model: nn.Module,
    state: SiteState,
    block: int,
    pruner: Pruner,
    sparsity: float,
    pattern: Pattern,
    ignore: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """The site's own keep-masks of ``block`` (pruned locally on a copy; the model is not changed)."""
    _check_block(state, block)
    blocks_name, blocks = find_blocks(model)
    prefix = f"{blocks_name}.{block}"
    stats = collect_block_stats(blocks[block], state.inputs, pruner.stat_kind, None, ignore, prefix)
    results = prune_layers(blocks[block], stats, pruner, sparsity, pattern, ignore, prefix)
    return {name: r.mask for name, r in results.items()}


def site_block_unit_votes(
    model: nn.Module,
    state: SiteState,
    block: int,
    pruner: Pruner,
    structure: Structure,
    attention: bool = True,
) -> dict[str, torch.Tensor]:
    """The site's own vote on the units of ``block`` (``pattern=structured``): its structured edit from
    its statistics (the model is not changed), as 0/1 per unit by granularity
    (:func:`fedprune.structured.vote.unit_votes`; ``attention`` False: of the block without its
    attention sublayer, no heads voted)."""
    stats = site_block_stats(model, state, block, pruner.stat_kind, None, (), without_attention=not attention)
    edit = structure.edit(find_blocks(model)[1][block], stats, pruner, attention)
    return unit_votes(edit, structure, attention)


def advance_site_(
    model: nn.Module,
    state: SiteState,
    block: int,
    edit,
    blocks: BlockAccess | None = None,
    without_attention: bool = False,
) -> None:
    """Move the site's inputs past the globally pruned ``block``: ``edit`` (a block edit of
    :mod:`fedprune.edits`) is applied to a copy of the dense block (``blocks``: where the model's blocks
    live, default in memory; ``without_attention``: the block's attention sublayer removed first);
    ``model`` is unchanged."""
    _check_block(state, block)
    if block + 1 < len(find_blocks(model)[1]):
        pruned = (blocks if blocks is not None else ResidentBlocks(model)).copy(block)
        if without_attention:
            remove_attention_(pruned, family_of(model.config))
        edit.apply_(pruned)
        state.inputs = run_block(pruned, state.inputs)
    state.block = block + 1


def skip_removed_blocks_(state: SiteState, removed: Sequence[int]) -> None:
    """Move the site's inputs past removed blocks (they pass their inputs on unchanged)."""
    while state.block in set(removed):
        state.inputs = BlockInputs(state.inputs.hidden, state.inputs.kwargs_per_block, state.block + 1)
        state.block += 1


def local_masks(
    model: nn.Module,
    calib_ids: torch.Tensor,
    pruner: Pruner,
    sparsity: float,
    pattern: Pattern,
    batch_size: int,
    ignore: Sequence[str] = (),
    allocation: AllocationRule | None = None,
) -> dict[str, torch.Tensor]:
    """One-shot: prune a private copy of the whole model sequentially (``allocation``: the site's own
    per-block sparsities from its data, e.g. OWL); its keep-masks by ``<block>.<layer>``."""
    local = copy.deepcopy(model)
    report = prune_model_(
        local,
        calib_ids,
        pruner,
        sparsity,
        pattern,
        batch_size,
        progress=False,
        keep_masks=True,
        ignore=ignore,
        allocation=allocation,
    )
    return report.masks


@dataclass(frozen=True)
class LocalVotes:
    """A one-shot site's votes: on the units of every dense block (by block, then granularity; zeros
    where the site removed the block, or its attention for the heads) and its depth vote by kind."""

    units: dict[int, dict[str, torch.Tensor]]
    depth: dict[str, torch.Tensor]


def local_unit_votes(
    model: nn.Module, calib_ids: torch.Tensor, pruner: Pruner, structure: Structure, batch_size: int
) -> LocalVotes:
    """One-shot ``pattern=structured``: prune a private copy of the whole model sequentially with the
    site's own structured edits (and its own depth choice); its votes."""
    local = copy.deepcopy(model)
    report = prune_model_(
        local,
        calib_ids,
        pruner,
        0.0,
        parse_pattern("structured"),
        batch_size,
        progress=False,
        structure=structure,
    )
    plan = report.depth or DepthPlan()
    units = {}
    for block in range(structure.dense_blocks):
        votes = abstention(structure)  # zeros where the site removed the block (or its attention: heads)
        if block in report.edits:
            votes.update(unit_votes(report.edits[block], structure, block not in plan.attention))
        units[block] = votes
    return LocalVotes(units, depth_votes(plan, structure, pruner))


def block_layer_shapes(
    model: nn.Module, block: int, ignore: Sequence[str] = ()
) -> dict[str, tuple[int, int]]:
    """``(out, in)`` shapes of the prunable, not ignored layers of one block, by name."""
    blocks_name, blocks = find_blocks(model)
    layers = find_prunable_layers(blocks[block], ignore, f"{blocks_name}.{block}")
    return {name: tuple(get_weight(m).shape) for name, m in layers.items()}
