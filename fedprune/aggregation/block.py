"""The server's step per block: from the sites' aggregated payloads to the globally pruned block."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fedprune.aggregation.mask_vote import apply_vote, select_by_votes, vote_counts
from fedprune.allocation import as_allocation, qualified
from fedprune.masks import Pattern
from fedprune.models import find_blocks, find_prunable_layers, get_weight
from fedprune.pruners.base import Pruner
from fedprune.sequential import apply_weights_, prune_layers
from fedprune.stats import BlockStats, Stats, as_block_stats, common_groups, sum_stats

logger = logging.getLogger(__name__)


def aggregate_stats(site_stats: Sequence[Mapping[str, Stats]]) -> BlockStats:
    """Per layer, the exact sum of the sites' statistics; layers sharing one entry at every site share
    one sum (one Stats object)."""
    if not site_stats:
        raise ValueError("no site statistics to aggregate")
    blocks = [as_block_stats(s) for s in site_stats]
    groups = common_groups(blocks)
    sums = {tuple(group): sum_stats([b[group[0]] for b in blocks]) for group in groups}
    return BlockStats(sums, order=blocks[0])


def prune_block_from_stats_(
    model: nn.Module,
    block: int,
    stats: dict[str, Stats],
    pruner: Pruner,
    sparsity: float,
    pattern: Pattern,
    ignore: Sequence[str] = (),
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Prune ``block`` of the global model with the centralized code (``ignore``: layers left dense);
    return (masks, new weights)."""
    blocks_name, blocks = find_blocks(model)
    results = prune_layers(blocks[block], stats, pruner, sparsity, pattern, ignore, f"{blocks_name}.{block}")
    weights = {name: r.weight for name, r in results.items()}
    apply_weights_(blocks[block], weights)
    return {name: r.mask for name, r in results.items()}, weights


def vote_block_(
    model: nn.Module,
    block: int,
    site_masks: Sequence[dict[str, torch.Tensor]],
    sparsity: float,
    pattern: Pattern,
    group: str,
    scaling: bool,
    seed: int,
    ignore: Sequence[str] = (),
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Aggregate the sites' masks of ``block`` by voting and apply it to the global dense weights."""
    counts = {name: vote_counts([m[name] for m in site_masks]) for name in site_masks[0]}
    return vote_block_from_counts_(
        model, block, counts, len(site_masks), sparsity, pattern, group, scaling, seed, ignore
    )


def vote_block_from_counts_(
    model: nn.Module,
    block: int,
    counts: dict[str, torch.Tensor],
    num_sites: int,
    sparsity: float,
    pattern: Pattern,
    group: str,
    scaling: bool,
    seed: int,
    ignore: Sequence[str] = (),
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Vote ``block`` from per-weight keep counts of ``num_sites`` sites (e.g. a secure sum of votes);
    layers matched by ``ignore`` are left dense and need no counts."""
    blocks_name, blocks = find_blocks(model)
    masks, weights = {}, {}
    prefix, allocation = f"{blocks_name}.{block}", as_allocation(sparsity)
    for name, layer in find_prunable_layers(blocks[block], ignore, prefix).items():
        layer_sparsity = allocation.of(qualified(prefix, name))
        keep = select_by_votes(counts[name], layer_sparsity, pattern, group, seed + block)
        masks[name] = keep
        weights[name] = apply_vote(get_weight(layer), keep, counts[name], num_sites, scaling)
    apply_weights_(blocks[block], weights)
    return masks, weights


def vote_model_from_counts_(
    model: nn.Module,
    counts: dict[str, torch.Tensor],
    num_sites: int,
    sparsity: float,
    pattern: Pattern,
    group: str,
    scaling: bool,
    seed: int,
    ignore: Sequence[str] = (),
) -> dict[int, dict[str, torch.Tensor]]:
    """Vote every block from keep counts keyed ``"<block>.<layer>"`` (FedPrLLM one-shot); keep-masks by block.

    The counts are all the server learns from the sites, so any ``group``/``scaling`` choice can be
    re-applied to the same counts later (``python -m cli.revote``) with the result a run would give.
    """
    _, blocks = find_blocks(model)
    masks = {}
    for block in range(len(blocks)):
        prefix = f"{block}."
        block_counts = {k[len(prefix) :]: v for k, v in counts.items() if k.startswith(prefix)}
        masks[block], _ = vote_block_from_counts_(
            model, block, block_counts, num_sites, sparsity, pattern, group, scaling, seed, ignore
        )
    return masks
