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
from fedprune.checkpoint import restore_block_
from fedprune.edits import BlockEdit, MaskEdit, WeightEdit
from fedprune.masks import Pattern
from fedprune.models import find_blocks, find_prunable_layers, layer_input_features
from fedprune.protocols.federation import Federation
from fedprune.protocols.messages import BlockTask, MethodSpec, SiteJob, reply_count, reply_tokens
from fedprune.protocols.run_state import (
    RunCheckpoints,
    federation_state,
    node_mapping,
    outcome_state,
    remap_,
    restore_federation_,
    restore_outcome_,
)
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
    checkpoints: RunCheckpoints | None = None  # per-block checkpoints, and the one to resume (layer_sync)
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
    tokens: dict[int, int] = field(default_factory=dict)  # calibration tokens by node (0s if secure)
    calib_tokens: int = 0  # total calibration tokens of the sites in the last sum
    allocation: Allocated | None = None  # a non-uniform allocation's result, if any
    allocation_sites: tuple[int, ...] = ()  # the sites whose dense statistics entered it
    dp_rho_spent: dict[int, float] = field(default_factory=dict)  # DP: per site, rho its releases reported

    def record(self, blocks_name: str, block: int, removed: dict[str, float]) -> None:
        """Record what a block edit removed (``edit.report()``: fraction by layer)."""
        for name, fraction in removed.items():
            self.layer_sparsity[f"{blocks_name}.{block}.{name}"] = fraction

    @property
    def final_sites(self) -> tuple[int, ...]:
        """The sites whose data entered the last sum (those of the pruned model's last block)."""
        return self.sites_per_sum[-1] if self.sites_per_sum else ()


def task_config(job: FederatedJob, block: BlockTask | None = None) -> dict:
    """The flat record of one task: the site job, the method and, per block, the block task."""
    config = {**job.site_job.to_record(), **job.method.to_record()}
    return {**config, **block.to_record()} if block is not None else config


MAX_NUMBER = 2**62  # bound of a site number or instance number in a reply


def start_sites(fed: Federation, job: FederatedJob, nodes: list[int] | None = None) -> dict[int, int]:
    """``query.start`` to every site (or ``nodes`` only: no minimum of replies); their token counts (0 in a
    secure job: only sums reveal them; their site numbers go to ``fed.site_numbers``)."""
    config = job.site_job.to_record()

    def validate(node: int, reply) -> tuple[int, int]:
        return reply_tokens(reply.metrics, config), reply_count(reply.metrics, "site", MAX_NUMBER)

    got = fed.round("query.start", config, None, validate, nodes, required=None if nodes is None else 0)
    fed.site_numbers.update({n: s for n, (_, s) in got.items()})
    return {n: t for n, (t, _) in got.items()}


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
    With ``job.checkpoints``, every finished block is checkpointed, and a checkpoint to resume from
    replaces the start (:func:`resume_layer_sync`): the loop goes on after its last finished block.
    """
    outcome = FederatedOutcome()
    blocks_name, blocks = find_blocks(job.model)
    sums = job.sums(fed)
    saved = job.checkpoints.saved if job.checkpoints is not None else None
    if saved is None:
        outcome.tokens = start_sites(fed, job)
        if job.allocation is not None:
            outcome.allocation, outcome.allocation_sites = dense_allocation(sums, job, outcome.tokens)
        decision = plan_depth(sums, outcome.tokens) if plan_depth is not None else DepthDecision()
        plan, outcome.depth_sites = decision.plan, decision.sites
        if decision.sites is not None:
            outcome.sites_per_sum.append(decision.sites)
        update, update_kind, finished, kinds = None, "masks", [], {}
    else:  # resume=true: no structured depth pruning (refused), so no block is removed
        plan, finished = DepthPlan(), list(saved.blocks)
        kinds = {int(b): k for b, k in saved.state["kinds"].items()}
        update, update_kind = resume_layer_sync(fed, job, sums, outcome, saved, kinds)
    decided = [b for b in range(len(blocks)) if b not in plan.blocks]
    todo = [b for b in decided if b not in finished]
    for block in tqdm(todo, desc=f"federated {label}", disable=not job.progress):
        sparsity = outcome.allocation.block_sparsity[block] if outcome.allocation is not None else None
        task = BlockTask(
            block,
            update_kind,
            removed_blocks=plan.blocks,
            removed_attention=plan.attention,
            sparsity=sparsity,
        )
        config = task_config(job, task)
        if block == todo[0]:
            sums.prepare(config, len(todo))
        with held_block(job.block_access, block) as module:
            edit, sites = step(sums, block, config, update, outcome.tokens)
            outcome.record(blocks_name, block, edit.report())
            outcome.sites_per_sum.append(sites)
            update, update_kind = edit.encode(), edit.kind
            finished.append(block)
            kinds[block] = update_kind
            if job.checkpoints is not None:
                state = run_state(fed, outcome, sums, kinds)
                job.checkpoints.save(job.site_job.run_key, finished, module, update, state)
    outcome.calib_tokens = sums.last_tokens
    finish_sites(fed, job)
    outcome.dp_rho_spent = dict(sums.dp_rho_spent)
    remove_blocks_(job.model, plan.blocks)  # the sites never needed them: removed whole at the end
    return outcome


def run_state(fed: Federation, outcome: FederatedOutcome, sums: Sums, kinds: dict[int, str]) -> dict:
    """What a checkpoint keeps of a layer-synchronous run besides the blocks (JSON)."""
    return {
        "kinds": {str(b): k for b, k in kinds.items()},
        "outcome": outcome_state(outcome),
        "federation": federation_state(fed),
        "sums": sums.progress(),
    }


@dataclass(frozen=True)
class SiteStatus:
    """What a site holds for a resumed run: its number, the block its inputs are of (-1: nothing), its
    tokens and its next unused secure-aggregation instance."""

    site: int
    block: int
    tokens: int
    secagg_next: int


def query_sites(fed: Federation, job: FederatedJob) -> dict[int, SiteStatus]:
    """``query.resume`` to every connected site: what each still holds for the run key."""
    config = job.site_job.to_record()
    blocks = len(find_blocks(job.model)[1])

    def validate(node: int, reply) -> SiteStatus:
        metrics = reply.metrics
        block = -1 if metrics.get("block") == -1 else reply_count(metrics, "block", blocks)
        site, tokens = reply_count(metrics, "site", MAX_NUMBER), reply_tokens(metrics, config)
        return SiteStatus(site, block, tokens, reply_count(metrics, "secagg_next", MAX_NUMBER))

    return fed.round("query.resume", config, None, validate)


def resume_layer_sync(
    fed: Federation,
    job: FederatedJob,
    sums: Sums,
    outcome: FederatedOutcome,
    saved,
    kinds: dict[int, str],
) -> tuple[dict, str]:
    """Continue a killed run from its checkpoint ``saved``: the server's finished blocks restored, its
    outcome and counters under this run's node ids, dropped sites left out, and every site ready for the
    next block: one that still holds its inputs keeps them; one that lost them is started again and
    moved through the checkpointed edits of the finished blocks. Returns the last finished block's edit
    (the next task carries it) and its kind."""
    for block in saved.blocks:
        with held_block(job.block_access, block) as module:
            restore_block_(module, saved.tensors(block))
    state = saved.state
    restore_outcome_(outcome, state["outcome"])
    restore_federation_(fed, state["federation"])
    old_sites, alive = dict(fed.site_numbers), set(state["federation"]["nodes"])
    status = query_sites(fed, job)
    remap_(fed, outcome, node_mapping(old_sites, {n: s.site for n, s in status.items()}))
    known = {site for node, site in old_sites.items() if node in alive}
    for node in [n for n in fed.nodes if n not in status or status[n].site not in known]:
        fed.reject(len(fed.round_seconds) - 1, node, "not among the checkpoint's sites (dropped before)")
    fed.nodes = [n for n in fed.nodes if n in status and status[n].site in known]
    fed.site_numbers.update({n: status[n].site for n in fed.nodes})
    outcome.tokens.update({n: status[n].tokens for n in fed.nodes if status[n].block >= 0})
    last, blocks = saved.blocks[-1], len(find_blocks(job.model)[1])
    lost = [n for n in fed.nodes if status[n].block not in (last, last + 1)] if last + 1 < blocks else []
    if lost:
        logger.info("resume: %d site(s) lost their state; starting them again from the checkpoint", len(lost))
        outcome.tokens.update(start_sites(fed, job, lost))
        for block in saved.blocks[:-1]:
            config = task_config(job, BlockTask(block + 1, kinds[block]))
            nodes = [n for n in lost if n in fed.nodes]
            fed.round("query.advance", config, saved.edit_arrays(block), lambda n, r: None, nodes, required=0)
    sums.restore_(state["sums"], max((s.secagg_next for s in status.values()), default=0))
    logger.info("resumed after block %d with %d site(s)", last, len(fed.nodes))
    return saved.edit_arrays(last), kinds[last]


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
