"""What the LLM protocols' server routines share: the run's :class:`FederatedJob`, its outcome, and the
per-block loop of the layer-synchronous protocols (``stats_sync``, ``mask_vote_sync``).

Per block b the server sends the task with the edit of block b-1 (its masks, or its weights when kept
weights changed), obtains the SUM of the sites' payloads (:mod:`fedprune.protocols.sums`), decides
block b, and records which sites' data entered that sum.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from fedprune.aggregation.site_checks import SiteChecks
from fedprune.allocation_rules import Allocated, AllocationRule
from fedprune.edits import BlockEdit, MaskEdit, WeightEdit
from fedprune.masks import Pattern
from fedprune.models import find_blocks, find_prunable_layers, layer_input_features
from fedprune.protocols.federation import Federation
from fedprune.protocols.messages import BlockTask, MethodSpec, SiteJob, reply_tokens
from fedprune.protocols.sums import PRIVACY, Sums
from fedprune.pruners.base import Pruner
from fedprune.secure.identity import Roster
from fedprune.secure.plan import SecurePlan
from fedprune.sequential import BlockAccess, ResidentBlocks, allocate, held_block
from fedprune.stats import split_model_stats
from fedprune.structured.decide import DepthPlan, Structure
from fedprune.structured.depth import remove_blocks_

logger = logging.getLogger(__name__)


@dataclass
class FederatedJob:
    """What a server routine needs: the global model (pruned in place), the method, the sites' job."""

    model: torch.nn.Module
    pruner: Pruner
    method: MethodSpec
    pattern: Pattern
    site_job: SiteJob
    options: object = None  # the protocol's typed config
    seed: int = 0
    progress: bool = True
    privacy: str = "none"  # none | secagg | secagg_dp
    plan: SecurePlan | None = None  # public secure-aggregation parameters (privacy != none)
    blocks: BlockAccess | None = None  # where the model's blocks live (None: in memory)
    structure: Structure | None = None  # pattern=structured: the units the server removes per block
    allocation: AllocationRule | None = None  # a non-uniform allocation rule (OWL); None: uniform
    checks: SiteChecks = field(default_factory=SiteChecks)  # of site statistics in the clear (privacy=none)
    roster: Roster | None = None  # the sites' identity public keys: authenticated secure aggregation

    @property
    def block_access(self) -> BlockAccess:
        """The blocks the server decides, each loaded for its step (offloaded: then saved and released)."""
        return self.blocks if self.blocks is not None else ResidentBlocks(self.model)

    @property
    def sparsity(self) -> float:
        return self.method.sparsity

    @property
    def ignore(self) -> tuple[str, ...]:
        """Layer-name patterns left dense."""
        return self.site_job.ignore

    def sums(self, fed: Federation) -> Sums:
        """This run's way of summing the sites' payloads."""
        return PRIVACY[self.privacy](fed, self.plan, self.pruner.stat_kind, self.checks, self.roster)


@dataclass
class FederatedOutcome:
    """What a server routine reports besides the pruned model: which sites' data entered each sum."""

    layer_sparsity: dict[str, float] = field(default_factory=dict)
    votes: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # mask_vote: keep counts by "<block>.<layer>"
    vote_sites: int = 0  # mask_vote: how many sites' masks the counts sum
    sites_per_sum: list[tuple[int, ...]] = field(default_factory=list)  # node ids, one entry per sum
    depth_sites: tuple[int, ...] | None = None  # depth pruning: whose influence sums / votes chose it
    tokens: dict[int, int] = field(default_factory=dict)  # calibration tokens by node
    allocation: Allocated | None = None  # a non-uniform allocation's result, if any
    allocation_sites: tuple[int, ...] = ()  # the sites whose dense statistics entered it

    def record(self, blocks_name: str, block: int, removed: dict[str, float]) -> None:
        """Record what a block edit removed (``edit.report()``: fraction by layer)."""
        for name, fraction in removed.items():
            self.layer_sparsity[f"{blocks_name}.{block}.{name}"] = fraction

    @property
    def final_sites(self) -> tuple[int, ...]:
        """The sites whose data entered the last sum (those of the pruned model's last block)."""
        return self.sites_per_sum[-1] if self.sites_per_sum else ()

    @property
    def calib_tokens(self) -> int:
        """Calibration tokens of the sites in the last sum."""
        return sum(self.tokens[node] for node in self.final_sites)


def task_config(job: FederatedJob, block: BlockTask | None = None) -> dict:
    """The flat record of one task: the site job, the method and, per block, the block task."""
    config = {**job.site_job.to_record(), **job.method.to_record()}
    return {**config, **block.to_record()} if block is not None else config


def start_sites(fed: Federation, job: FederatedJob) -> dict[int, int]:
    """``query.start`` to every site; their token counts."""
    return fed.round(
        "query.start",
        job.site_job.to_record(),
        None,
        lambda node, reply: reply_tokens(reply.metrics, job.site_job.to_record()),
    )


def finish_sites(fed: Federation, job: FederatedJob) -> None:
    """``query.finish``: every site deletes its state of the run."""
    fed.round("query.finish", job.site_job.to_record(), None, lambda node, reply: None)


def block_edit(masks: dict, weights: dict, weights_changed: bool) -> BlockEdit:
    """A block's edit in the cheapest form for the wire: masks unless kept weights changed."""
    return WeightEdit(weights, masks) if weights_changed else MaskEdit(masks)


@dataclass(frozen=True)
class DepthDecision:
    """The blocks and attention sublayers a run removes, and the sites whose data (influence sums or
    depth votes) entered that choice (``None``: no sum, e.g. none removed or ``pruner=gatenorm``)."""

    plan: DepthPlan = field(default_factory=DepthPlan)
    sites: tuple[int, ...] | None = None


BlockStep = Callable[[Sums, int, dict, dict | None, dict[int, int]], tuple[BlockEdit, tuple]]
DepthStep = Callable[[Sums, dict[int, int]], DepthDecision]


def layer_sync(
    fed: Federation,
    job: FederatedJob,
    label: str,
    step: BlockStep,
    plan_depth: DepthStep | None = None,
) -> FederatedOutcome:
    """The per-block loop of the layer-synchronous protocols (one sum per block).

    ``step(sums, block, config, update, tokens)`` returns the block's edit (applied to the global model;
    it travels to the sites with the next task) and the sites whose data entered its sum. The global block
    is loaded for its step (:attr:`FederatedJob.block_access`). ``plan_depth(sums, tokens)``, once the sites have started: the
    blocks removed whole (no round; the sites pass their inputs on) and the attention sublayers removed
    (structured depth pruning); every task tells the sites, and the removed blocks leave the global model
    at the end. Its sum, if any, is the first entry of ``sites_per_sum`` and ``depth_sites``.
    With a non-uniform allocation (``job.allocation``, e.g. OWL), first one sum of every dense block's
    statistics (:func:`dense_allocation`); each block task then carries its block's sparsity.
    """
    outcome = FederatedOutcome()
    outcome.tokens = start_sites(fed, job)
    blocks_name, blocks = find_blocks(job.model)
    sums = job.sums(fed)
    if job.allocation is not None:
        outcome.allocation, outcome.allocation_sites = dense_allocation(sums, job, outcome.tokens)
    decision = plan_depth(sums, outcome.tokens) if plan_depth is not None else DepthDecision()
    plan, outcome.depth_sites = decision.plan, decision.sites
    if decision.sites is not None:
        outcome.sites_per_sum.append(decision.sites)
    update, update_kind = None, "masks"
    decided = [b for b in range(len(blocks)) if b not in plan.blocks]
    for block in tqdm(decided, desc=f"federated {label}", disable=not job.progress):
        sparsity = outcome.allocation.block_sparsity[block] if outcome.allocation is not None else None
        task = BlockTask(
            block,
            update_kind,
            removed_blocks=plan.blocks,
            removed_attention=plan.attention,
            sparsity=sparsity,
        )
        config = task_config(job, task)
        if block == decided[0]:
            sums.prepare(config, len(decided))
        with held_block(job.block_access, block):
            edit, sites = step(sums, block, config, update, outcome.tokens)
        outcome.record(blocks_name, block, edit.report())
        outcome.sites_per_sum.append(sites)
        update, update_kind = edit.encode(), edit.kind
    finish_sites(fed, job)
    remove_blocks_(job.model, plan.blocks)  # the sites never needed them: removed whole at the end
    return outcome


def dense_allocation(
    sums: Sums, job: FederatedJob, tokens: dict[int, int]
) -> tuple[Allocated, tuple[int, ...]]:
    """The job's allocation rule applied to the SUM of the sites' statistics of every dense block (one
    round, task ``dense``); also the sites whose data entered that sum."""
    rule = job.allocation
    blocks_name, blocks = find_blocks(job.model)
    config = task_config(job, BlockTask(0, task="dense", stat_kind=rule.dense_stat_kind))
    widths = {
        f"{index}.{name}": layer_input_features(layer)
        for index, block in enumerate(blocks)
        for name, layer in find_prunable_layers(block, job.ignore, f"{blocks_name}.{index}").items()
    }
    summed = sums.stats(config, None, widths, tokens, kind=rule.dense_stat_kind)
    dense = split_model_stats(summed.stats, len(blocks))
    return allocate(rule, job.block_access, dense, job.sparsity, job.ignore), summed.sites


def task_sparsity(config: dict, job: FederatedJob) -> float:
    """The sparsity of the block a task is about: its own (a non-uniform allocation) or the job's."""
    sparsity = BlockTask.from_record(config).sparsity
    return job.sparsity if sparsity is None else sparsity
