"""``stats_sync`` (exact): per block, sites upload summed statistics with token counts (Wanda Σx²,
SparseGPT Σxxᵀ upper triangle); the server adds them and prunes with the centralized code, so the
result equals centralized pruning on the pooled data. Secure aggregation and DP apply.

Site tasks: ``query.start``, ``train.stats`` (or ``train.secagg`` with task ``stats``), ``query.finish``
(:mod:`fedprune.protocols.llm_site`); a resumed run (``resume=true``) also ``query.resume`` and
``query.advance``. Every finished block is checkpointed (:mod:`fedprune.protocols.run_state`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedprune.aggregation.block import prune_block_from_stats_
from fedprune.config import JobConfig, build_pruner, check
from fedprune.job import summary_table
from fedprune.models import find_blocks, find_prunable_layers, layer_input_features
from fedprune.payload import encode_stats
from fedprune.protocols.centralized import NoOptions
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
from fedprune.protocols.llm_site import Payload, block_payload, summed_task
from fedprune.protocols.messages import BlockTask, MethodSpec, SiteJob
from fedprune.protocols.registry import ProtocolUnit, register_protocol
from fedprune.protocols.sums import Sums
from fedprune.protocols.tasks import Site
from fedprune.site import site_block_stats, site_dense_stats, site_influence
from fedprune.structured.decide import DepthPlan
from fedprune.structured.depth import (
    INFLUENCE,
    INFLUENCE_ATTENTION,
    INFLUENCE_BLOCKS,
    Influence,
    remove_attention_,
)

logger = logging.getLogger(__name__)


@summed_task("stats")
def stats_payload(site: Site, request: Request, token_bound: float | None = None) -> Payload:
    """Site: [apply block b-1], then this site's statistics of block b (``token_bound``: DP clip of each
    token first)."""

    def compute(model, state, job: SiteJob, method: MethodSpec, task: BlockTask) -> dict:
        if task.task == "influence":  # structured depth pruning: the dense model's influence sums
            return encode_stats(site_influence(model, state))
        if task.task == "dense":  # an allocation rule (OWL): every dense block's statistics
            return encode_stats(site_dense_stats(model, state, task.stat_kind, job.ignore, token_bound))
        without_attention = task.block in task.removed_attention
        stats = site_block_stats(
            model, state, task.block, method.stat_kind, token_bound, job.ignore, without_attention
        )
        return encode_stats(stats)

    arrays, tokens = block_payload(site, request, compute)
    return Payload("stats", arrays, tokens)


def run_stats_sync(fed: Federation, job: FederatedJob) -> FederatedOutcome:
    """Exact federated pruning: summed statistics, centralized pruning code, per block."""
    if job.pruner.stat_kind is None:
        raise ValueError(f"stats_sync needs a pruner with statistics; {job.pruner.name!r} is data-free")
    blocks_name, blocks = find_blocks(job.model)

    plan = DepthPlan()

    def plan_depth(sums: Sums, tokens: dict[int, int]) -> DepthDecision:
        """Structured depth pruning: one sum of the sites' influence sums first (if the choice needs data)."""
        nonlocal plan
        structure = job.structure
        if structure is None or not structure.removes_depth:
            return DepthDecision(plan)
        influence, sites = None, None
        if structure.needs_influence(job.pruner):
            config = task_config(job, BlockTask(0, task="influence"))
            widths = {INFLUENCE_BLOCKS: len(blocks), INFLUENCE_ATTENTION: len(blocks)}
            summed = sums.stats(config, None, widths, tokens, kind=INFLUENCE)
            influence = Influence(summed.stats[INFLUENCE_BLOCKS], summed.stats[INFLUENCE_ATTENTION])
            sites = summed.sites
        plan = structure.depth_plan(influence, job.model, job.pruner)
        return DepthDecision(plan, sites)

    def step(sums: Sums, block: int, config: dict, update: dict | None, tokens: dict[int, int]):
        if block in plan.attention:
            remove_attention_(blocks[block], job.structure.family)
        layers = find_prunable_layers(blocks[block], job.ignore, f"{blocks_name}.{block}")
        widths = {name: layer_input_features(m) for name, m in layers.items()}
        summed = sums.stats(config, update, widths, tokens)
        if job.structure is not None:  # the global block becomes physically smaller
            edit = job.structure.edit(blocks[block], summed.stats, job.pruner, block not in plan.attention)
            edit.apply_(blocks[block])
            return edit, summed.sites
        masks, weights = prune_block_from_stats_(
            job.model, block, summed.stats, job.pruner, task_sparsity(config, job), job.pattern, job.ignore
        )
        return block_edit(masks, weights, job.pruner.updates_weights), summed.sites

    return layer_sync(fed, job, "stats", step, plan_depth)


def check_stats_sync(job: JobConfig) -> None:
    check_federated_llm(job)
    pruner = build_pruner(job.pruner)
    check(
        pruner.stat_kind is not None,
        "pruner.name",
        f"stats_sync needs a pruner with calibration statistics; {pruner.name!r} is data-free "
        "(use protocol=mask_vote or centralized)",
    )


def run_job(job: JobConfig, out_dir: Path, launch: Launcher) -> dict:
    options = NoOptions.from_options(job.protocol)
    return run_federated(job, out_dir, launch, run_stats_sync, options, checkpointed=True)


UNIT = register_protocol(
    ProtocolUnit(
        "stats_sync",
        NoOptions,
        run_job,
        check_stats_sync,
        summary_table,
        federated=True,
        secure=True,
        dp=True,
        offload=True,
        structured=True,
        depth=True,
        allocation=True,
        resumable=True,
    )
)
