"""``mask_vote`` (FedPrLLM one-shot): every site prunes its own copy fully and uploads all its masks
bit-packed (one round); the server keeps the most-kept weights within each comparison group
(``group``: layer, row or column; ``scaling``: kept weights times the fraction of sites that kept them).
Secure aggregation applies (the server learns only the per-weight keep counts).

With ``pattern=structured`` each site prunes its copy sequentially with its own structured edits and
uploads, per block and coupling, 0/1 per unit kept; the server keeps the most-voted units of every block
(ties: lower unit id) and makes the dense model smaller, kept weights dense
(:mod:`fedprune.structured.vote`). ``protocol.group`` / ``protocol.scaling`` do not apply;
``protocol.save_votes`` keeps the per-unit counts (``"<block>.ffn"``, ``"<block>.heads"``), which
``cli.revote`` does not re-vote (it has no server choice to change).

Depth pruning (``structured.blocks`` / ``structured.attention``): each site's own pruning removes the
blocks and attention sublayers of its own choice (its influence sums); it adds 1 bit per block and per
attention sublayer (``"depth.blocks"``, ``"depth.attention"``, 1 = kept) to the same upload, and zero
unit votes (an abstention) for the blocks or heads it removed. The server removes the blocks with the
fewest keep votes, then the attention sublayers with the fewest among the blocks that stay (ties: the
lower index is kept; ``pruner=gatenorm`` attention from the weights, no vote), then keeps the most-voted
units of every block that stays.

Site task: ``train.local_prune`` (or ``train.secagg`` with task ``local_prune``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from fedprune.aggregation.block import vote_model_from_counts_
from fedprune.allocation import Allocation
from fedprune.config import JobConfig
from fedprune.edits import MaskEdit
from fedprune.job import summary_table
from fedprune.masks import parse_pattern
from fedprune.models import find_blocks
from fedprune.protocols.federation import Federation, Launcher, Request
from fedprune.protocols.layer_sync import FederatedJob, FederatedOutcome, task_config
from fedprune.protocols.llm_job import check_federated_llm, run_federated
from fedprune.protocols.llm_site import (
    Payload,
    calibration_ids,
    site_model,
    site_pruner,
    site_structure,
    summed_task,
)
from fedprune.protocols.mask_vote_sync import SyncVoteOptions, check_structured_vote
from fedprune.protocols.messages import MethodSpec, SiteJob
from fedprune.protocols.registry import ProtocolUnit, register_protocol
from fedprune.protocols.tasks import Site
from fedprune.site import block_layer_shapes, local_masks, local_unit_votes
from fedprune.structured.depth import remove_attention_, remove_blocks_
from fedprune.structured.vote import (
    DEPTH_PREFIX,
    block_counts,
    depth_vote_shapes,
    vote_masks,
    vote_shapes,
    voted_depth_plan,
    voted_edit,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VoteOptions(SyncVoteOptions):
    """The iterative vote's options, and ``protocol.save_votes``: keep the counts (``votes.safetensors``)."""

    save_votes: bool = False


@summed_task("local_prune")
def local_prune_payload(site: Site, request: Request, token_bound: float | None = None) -> Payload:
    """Site: the keep-masks of its privately pruned whole model."""
    job, method = SiteJob.from_record(request.config), MethodSpec.from_record(request.config)
    ids = calibration_ids(job, site)
    pruner, model = site_pruner(method), site_model(job)
    structure = site_structure(method, model)
    if structure is not None:  # its unit votes of every block, "<block>.<granularity>" -> (1, units)
        votes = local_unit_votes(model, ids, pruner, structure, job.batch_size)
        masks = {k: v for b, block in votes.units.items() for k, v in vote_masks(block, f"{b}.").items()}
        masks.update(vote_masks(votes.depth, DEPTH_PREFIX))  # its depth vote, 1 bit per block and kind
        return Payload("masks", masks, int(ids.numel()))
    pattern = parse_pattern(method.pattern)
    rule = method.allocation_spec().rule()
    masks = local_masks(model, ids, pruner, method.sparsity, pattern, job.batch_size, job.ignore, rule)
    return Payload("masks", masks, int(ids.numel()))


def run_mask_vote(fed: Federation, job: FederatedJob) -> FederatedOutcome:
    """One upload of every site's masks of its privately pruned model; vote per layer."""
    options: VoteOptions = job.options
    if job.structure is not None:
        return run_structured_mask_vote(fed, job)
    outcome = FederatedOutcome()
    blocks_name, blocks = find_blocks(job.model)
    shapes = {
        f"{b}.{name}": shape
        for b in range(len(blocks))
        for name, shape in block_layer_shapes(job.model, b, job.ignore).items()
    }
    summed = job.sums(fed).votes("local_prune", task_config(job), None, shapes)
    sparsity = (
        job.sparsity if job.allocation is None else kept_share(summed.counts, summed.num_sites, blocks_name)
    )
    masks = vote_model_from_counts_(
        job.model,
        summed.counts,
        summed.num_sites,
        sparsity,
        job.pattern,
        options.group,
        options.scaling,
        job.seed,
        job.ignore,
    )
    for block, block_masks in masks.items():
        outcome.record(blocks_name, block, MaskEdit(block_masks).report())
    outcome.votes, outcome.vote_sites = summed.counts, summed.num_sites
    outcome.sites_per_sum, outcome.calib_tokens = [summed.sites], summed.tokens
    return outcome


def kept_share(counts: dict[str, torch.Tensor], num_sites: int, blocks_name: str) -> Allocation:
    """Each layer's sparsity as the sites' mean (a non-uniform allocation that each site applied on its own
    data): 1 − Σ keep counts / (sites · weights), from the counts alone (secure aggregation reveals them)."""
    per_layer = {
        f"{blocks_name}.{key}": 1.0 - float(c.sum()) / (num_sites * c.numel()) for key, c in counts.items()
    }
    return Allocation(0.0, per_layer)


def run_structured_mask_vote(fed: Federation, job: FederatedJob) -> FederatedOutcome:
    """``pattern=structured``: one upload of every site's unit votes of all blocks (and depth votes);
    the voted blocks and attention sublayers removed, per remaining block the most-voted units kept, the
    dense model made smaller."""
    outcome = FederatedOutcome()
    structure = job.structure
    blocks_name, blocks = find_blocks(job.model)
    shapes = {k: v for b in range(len(blocks)) for k, v in vote_shapes(structure, f"{b}.").items()}
    shapes.update(depth_vote_shapes(structure, job.pruner))
    summed = job.sums(fed).votes("local_prune", task_config(job), None, shapes)
    plan = voted_depth_plan(structure, block_counts(summed.counts, DEPTH_PREFIX), job.model, job.pruner)
    if structure.needs_influence(job.pruner):
        outcome.depth_sites = summed.sites
    for index, block in enumerate(blocks):
        if index in plan.blocks:
            continue
        attention = index not in plan.attention
        if not attention:
            remove_attention_(block, structure.family)
        edit = voted_edit(block, structure, block_counts(summed.counts, f"{index}."), attention)
        edit.apply_(block)
        outcome.record(blocks_name, index, edit.report())
    remove_blocks_(job.model, plan.blocks)
    # the per-unit counts by "<block>.<granularity>" (votes.safetensors with protocol.save_votes)
    outcome.votes = {k: v.reshape(-1) for k, v in summed.counts.items()}
    outcome.vote_sites = summed.num_sites
    outcome.sites_per_sum, outcome.calib_tokens = [summed.sites], summed.tokens
    return outcome


def check_mask_vote(job: JobConfig) -> None:
    check_federated_llm(job)
    check_structured_vote(job, VoteOptions.from_options(job.protocol))


def run_job(job: JobConfig, out_dir: Path, launch: Launcher) -> dict:
    return run_federated(job, out_dir, launch, run_mask_vote, VoteOptions.from_options(job.protocol))


UNIT = register_protocol(
    ProtocolUnit(
        "mask_vote",
        VoteOptions,
        run_job,
        check_mask_vote,
        summary_table,
        federated=True,
        secure=True,
        structured=True,
        depth=True,
        allocation=True,
    )
)
