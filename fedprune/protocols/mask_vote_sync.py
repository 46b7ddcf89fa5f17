"""``mask_vote_sync`` (FedPrLLM iterative): per block, sites send their own masks of the block; the
server votes them into the global mask and broadcasts the voted block before the next, so every site
computes the next block's inputs on the globally pruned model. Secure aggregation applies.

With ``pattern=structured`` the sites vote on whole units: each site computes its own structured edit of
the block and sends, per coupling (FFN neurons, key/value groups), 0/1 per unit kept; the server keeps
the most-voted units (ties: lower unit id) and sends the physically smaller block
(:mod:`fedprune.structured.vote`; kept weights stay dense: no OBS update, no bias compensation).
``protocol.group`` and ``protocol.scaling`` do not apply then (:func:`check_structured_vote`).

Depth pruning (``structured.blocks`` / ``structured.attention``): first one vote sum (task ``influence``):
each site chooses the blocks and attention sublayers centralized pruning would remove on its windows
alone (its own influence sums) and sends 1 bit per block and per attention sublayer (1 = kept); the
server removes the blocks with the fewest keep votes, then the attention sublayers with the fewest among
the blocks that stay (ties: the lower index is kept; :func:`depth_vote`). ``pruner=gatenorm`` ranks
attention sublayers from the dense weights: no vote, every party computes the same choice. The block
tasks then name the removed blocks and attention sublayers, as with ``stats_sync``.

Site tasks: ``query.start``, ``train.masks`` (or ``train.secagg`` with task ``masks``), ``query.finish``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from fedprune.aggregation.block import vote_block_from_counts_
from fedprune.config import JobConfig, check
from fedprune.edits import BlockEdit
from fedprune.job import summary_table
from fedprune.masks import GROUPS, parse_pattern
from fedprune.models import find_blocks
from fedprune.protocols.federation import Federation, Launcher, Request
from fedprune.protocols.layer_sync import (
    DepthDecision,
    FederatedJob,
    FederatedOutcome,
    block_edit,
    layer_sync,
    task_config,
    task_sparsity,
)
from fedprune.protocols.llm_job import check_federated_llm, run_federated
from fedprune.protocols.llm_site import Payload, block_payload, site_pruner, site_structure, summed_task
from fedprune.protocols.messages import BlockTask, MethodSpec, SiteJob
from fedprune.protocols.registry import ProtocolUnit, parse_options, register_protocol
from fedprune.protocols.sums import Sums
from fedprune.protocols.tasks import Site
from fedprune.site import block_layer_shapes, site_block_masks, site_block_unit_votes, site_depth_votes
from fedprune.structured.depth import remove_attention_
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
        pruner = site_pruner(method)
        structure = site_structure(method, model)
        if structure is not None and task.task == "influence":  # its depth vote, 1 bit per block and kind
            return vote_masks(site_depth_votes(model, state, pruner, structure), DEPTH_PREFIX)
        if structure is not None:  # its vote on the block's units, as (1, units) keep-masks
            attention = task.block not in task.removed_attention
            return vote_masks(site_block_unit_votes(model, state, task.block, pruner, structure, attention))
        pattern = parse_pattern(method.pattern)
        sparsity = method.sparsity if task.sparsity is None else task.sparsity
        return site_block_masks(model, state, task.block, pruner, sparsity, pattern, job.ignore)

    masks, tokens = block_payload(site, request, compute)
    return Payload("masks", masks, tokens)


def run_mask_vote_sync(fed: Federation, job: FederatedJob) -> FederatedOutcome:
    """Per block, the sites' own masks are voted into the global mask."""
    options: SyncVoteOptions = job.options

    def step(sums: Sums, block: int, config: dict, update: dict | None, tokens: dict[int, int]):
        if job.structure is not None:
            return structured_step(sums, job, block, config, update)
        shapes = block_layer_shapes(job.model, block, job.ignore)
        summed = sums.votes("masks", config, update, shapes)
        masks, weights = vote_block_from_counts_(
            job.model,
            block,
            summed.counts,
            summed.num_sites,
            task_sparsity(config, job),
            job.pattern,
            options.group,
            options.scaling,
            job.seed,
            job.ignore,
        )
        return block_edit(masks, weights, options.scaling), summed.sites

    return layer_sync(fed, job, "masks", step, lambda sums, tokens: depth_vote(sums, job))


def depth_vote(sums: Sums, job: FederatedJob) -> DepthDecision:
    """Structured depth pruning: the sum of the sites' depth votes (one round, none with nothing to vote:
    no depth pruning, or ``pruner=gatenorm`` attention only) and the global choice from it."""
    structure = job.structure
    if structure is None or not structure.removes_depth:
        return DepthDecision()
    shapes = depth_vote_shapes(structure, job.pruner)
    if not shapes:  # from the dense weights alone (gatenorm): every party computes the same choice
        return DepthDecision(voted_depth_plan(structure, {}, job.model, job.pruner))
    summed = sums.votes("masks", task_config(job, BlockTask(0, task="influence")), None, shapes)
    counts = block_counts(summed.counts, DEPTH_PREFIX)
    return DepthDecision(voted_depth_plan(structure, counts, job.model, job.pruner), summed.sites)


def structured_step(
    sums: Sums, job: FederatedJob, block: int, config: dict, update: dict | None
) -> tuple[BlockEdit, tuple]:
    """``pattern=structured``: the sites' unit votes of ``block`` summed; the most-voted units kept and
    the global block made smaller (its edit travels with the next task). A block whose attention
    sublayer is removed (the task says so) loses it first; its heads are not voted."""
    attention = block not in BlockTask.from_record(config).removed_attention
    summed = sums.votes("masks", config, update, vote_shapes(job.structure, attention=attention))
    module = find_blocks(job.model)[1][block]
    if not attention:
        remove_attention_(module, job.structure.family)
    counts = {g: c.reshape(-1) for g, c in summed.counts.items()}
    edit = voted_edit(module, job.structure, counts, attention)
    edit.apply_(module)
    return edit, summed.sites


def check_structured_vote(job: JobConfig, options: SyncVoteOptions) -> None:
    """``pattern=structured``: units are compared within each block's coupling (its FFN neurons, its
    key/value groups) and keep their dense weights, so ``protocol.group`` and ``protocol.scaling`` must
    stay at their defaults."""
    if str(job.pattern) != "structured":
        return
    check(
        options.group == "layer",
        "protocol.group",
        f"does not apply to pattern=structured (sites vote on whole units, compared within each block's "
        f"FFN neurons and key/value groups); leave it at 'layer', got {options.group!r}",
    )
    check(
        not options.scaling,
        "protocol.scaling",
        "does not apply to pattern=structured (the voted units keep their dense weights); leave it false",
    )


def check_mask_vote_sync(job: JobConfig) -> None:
    check_federated_llm(job)
    check_structured_vote(job, SyncVoteOptions.from_options(job.protocol))


def run_job(job: JobConfig, out_dir: Path, launch: Launcher) -> dict:
    return run_federated(job, out_dir, launch, run_mask_vote_sync, SyncVoteOptions.from_options(job.protocol))


UNIT = register_protocol(
    ProtocolUnit(
        "mask_vote_sync",
        SyncVoteOptions,
        run_job,
        check_mask_vote_sync,
        summary_table,
        federated=True,
        secure=True,
        offload=True,
        structured=True,
        depth=True,
        allocation=True,
    )
)
