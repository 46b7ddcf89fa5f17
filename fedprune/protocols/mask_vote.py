"""``mask_vote`` (FedPrLLM one-shot): every site prunes its own copy fully and uploads all its masks
bit-packed (one round); the server keeps the most-kept weights within each comparison group
(``group``: layer, row or column; ``scaling``: kept weights times the fraction of sites that kept them).
Secure aggregation applies (the server learns only the per-weight keep counts).

Site task: ``train.local_prune`` (or ``train.secagg`` with task ``local_prune``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from fedprune.aggregation.block import vote_model_from_counts_
from fedprune.config import JobConfig
from fedprune.edits import MaskEdit
from fedprune.job import summary_table
from fedprune.masks import parse_pattern
from fedprune.models import find_blocks
from fedprune.protocols.federation import Federation, Launcher, Request
from fedprune.protocols.layer_sync import FederatedJob, FederatedOutcome, task_config
from fedprune.protocols.llm_job import check_federated_llm, run_federated
from fedprune.protocols.llm_site import Payload, calibration_ids, site_model, site_pruner, summed_task
from fedprune.protocols.mask_vote_sync import SyncVoteOptions
from fedprune.protocols.messages import MethodSpec, SiteJob
from fedprune.protocols.registry import ProtocolUnit, register_protocol
from fedprune.protocols.tasks import Site
from fedprune.site import block_layer_shapes, local_masks

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
    pattern = parse_pattern(method.pattern)
    pruner = site_pruner(method)
    masks = local_masks(site_model(job), ids, pruner, method.sparsity, pattern, job.batch_size, job.ignore)
    return Payload("masks", masks, int(ids.numel()))


def run_mask_vote(fed: Federation, job: FederatedJob) -> FederatedOutcome:
    """One upload of every site's masks of its privately pruned model; vote per layer."""
    options: VoteOptions = job.options
    outcome = FederatedOutcome()
    blocks_name, blocks = find_blocks(job.model)
    shapes = {
        f"{b}.{name}": shape
        for b in range(len(blocks))
        for name, shape in block_layer_shapes(job.model, b, job.ignore).items()
    }
    summed = job.sums(fed).votes("local_prune", task_config(job), None, shapes)
    masks = vote_model_from_counts_(
        job.model,
        summed.counts,
        summed.num_sites,
        job.sparsity,
        job.pattern,
        options.group,
        options.scaling,
        job.seed,
        job.ignore,
    )
    for block, block_masks in masks.items():
        outcome.record(blocks_name, block, MaskEdit(block_masks).report())
    outcome.votes, outcome.vote_sites = summed.counts, summed.num_sites
    outcome.sites_per_sum, outcome.tokens = [summed.sites], summed.tokens
    return outcome


def run_job(job: JobConfig, out_dir: Path, launch: Launcher) -> dict:
    return run_federated(job, out_dir, launch, run_mask_vote, VoteOptions.from_options(job.protocol))


UNIT = register_protocol(
    ProtocolUnit(
        "mask_vote", VoteOptions, run_job, check_federated_llm, summary_table, federated=True, secure=True
    )
)
