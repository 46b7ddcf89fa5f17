"""``mask_vote_sync`` (FedPrLLM iterative): per block, sites send their own masks of the block; the
server votes them into the global mask and broadcasts the voted block before the next, so every site
computes the next block's inputs on the globally pruned model. Secure aggregation applies.

Site tasks: ``query.start``, ``train.masks`` (or ``train.secagg`` with task ``masks``), ``query.finish``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from fedprune.aggregation.block import vote_block_from_counts_
from fedprune.config import JobConfig, check
from fedprune.job import summary_table
from fedprune.masks import GROUPS, parse_pattern
from fedprune.protocols.federation import Federation, Launcher, Request
from fedprune.protocols.layer_sync import FederatedJob, FederatedOutcome, block_edit, layer_sync
from fedprune.protocols.llm_job import check_federated_llm, run_federated
from fedprune.protocols.llm_site import Payload, block_payload, site_pruner, summed_task
from fedprune.protocols.messages import BlockTask, MethodSpec, SiteJob
from fedprune.protocols.registry import ProtocolUnit, parse_options, register_protocol
from fedprune.protocols.sums import Sums
from fedprune.protocols.tasks import Site
from fedprune.site import block_layer_shapes, site_block_masks

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncVoteOptions:
    """``protocol.group`` (layer, row, column) and ``protocol.scaling``."""

    group: str = "layer"
    scaling: bool = False

    def __post_init__(self) -> None:
        check(self.group in GROUPS, "protocol.group", f"must be one of {GROUPS}, got {self.group}")

    @classmethod
    def from_options(cls, options) -> SyncVoteOptions:
        return parse_options(cls, options)


@summed_task("masks")
def masks_payload(site: Site, request: Request, token_bound: float | None = None) -> Payload:
    """Site: [apply block b-1], then this site's own keep-masks of block b."""

    def compute(model, state, job: SiteJob, method: MethodSpec, task: BlockTask) -> dict:
        pattern = parse_pattern(method.pattern)
        pruner = site_pruner(method)
        return site_block_masks(model, state, task.block, pruner, method.sparsity, pattern, job.ignore)

    masks, tokens = block_payload(site, request, compute)
    return Payload("masks", masks, tokens)


def run_mask_vote_sync(fed: Federation, job: FederatedJob) -> FederatedOutcome:
    """Per block, the sites' own masks are voted into the global mask."""
    options: SyncVoteOptions = job.options

    def step(sums: Sums, block: int, config: dict, update: dict | None, tokens: dict[int, int]):
        shapes = block_layer_shapes(job.model, block, job.ignore)
        summed = sums.votes("masks", config, update, shapes)
        masks, weights = vote_block_from_counts_(
            job.model,
            block,
            summed.counts,
            summed.num_sites,
            job.sparsity,
            job.pattern,
            options.group,
            options.scaling,
            job.seed,
            job.ignore,
        )
        return block_edit(masks, weights, options.scaling), summed.sites

    return layer_sync(fed, job, "masks", step)


def run_job(job: JobConfig, out_dir: Path, launch: Launcher) -> dict:
    return run_federated(job, out_dir, launch, run_mask_vote_sync, SyncVoteOptions.from_options(job.protocol))


UNIT = register_protocol(
    ProtocolUnit(
        "mask_vote_sync",
        SyncVoteOptions,
        run_job,
        check_federated_llm,
        summary_table,
        federated=True,
        secure=True,
        offload=True,
    )
)
