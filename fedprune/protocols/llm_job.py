"""A federated LLM pruning job: evaluate dense, run the protocol's server routine over a federation,
evaluate, write outputs. The federation comes from a launcher (a Flower simulation or deployment in
``server/``, or in process), so the same job serves all of them.

``metrics.json`` reports what happened: ``num_clients`` and ``calib_tokens`` are the sites (and their
tokens) whose data entered the final sums; ``sites_per_sum`` lists the sites of every sum where they
differ (a site that dropped out or whose reply was rejected); ``depth_sites`` the sites whose influence
sums or depth votes chose the removed blocks and attention sublayers (structured depth pruning);
``rejected`` every reply left out, with its reason (malformed, implausible statistics, or a site's
refusal of the plan), ``robust`` / ``robust_scale`` appear when ``federation.robust`` was on, and with
DP ``dp_rho_spent`` gives, per site (node id), the zCDP ``rho`` its releases in this run spent, as each
site priced them (every DP reply the server received, used in a sum or not).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path

from fedprune import checkpoint
from fedprune.aggregation.site_checks import SiteChecks
from fedprune.checkpoint import Checkpoint
from fedprune.config import JobConfig, check
from fedprune.job import (
    Prepared,
    allocation_metrics,
    base_metrics,
    discard_,
    prepare,
    privacy_metrics,
    write_outputs,
)
from fedprune.outputs import save_tensors_atomic
from fedprune.protocols.centralized import check_llm, resumable
from fedprune.protocols.federation import Federation, Launcher
from fedprune.protocols.layer_sync import FederatedJob, FederatedOutcome
from fedprune.protocols.messages import MethodSpec, SiteJob
from fedprune.protocols.run_state import RunCheckpoints
from fedprune.protocols.secure_sums import plan_from_job, roster_from_job
from fedprune.sequential import BlockAccess
from fedprune.timing import StepClock

logger = logging.getLogger(__name__)

ServerRoutine = Callable[[Federation, FederatedJob], FederatedOutcome]


def check_federated_llm(job: JobConfig) -> None:
    """The LLM checks; sites compute on their own CPUs, so the server's ``device`` must be ``cpu``."""
    check_llm(job)
    check(
        job.device == "cpu",
        "device",
        f"federated protocols compute on each site's CPU; got {job.device!r} (use device=cpu, or "
        "protocol=centralized / local to prune on another device)",
    )


def run_federated(
    job: JobConfig,
    out_dir: Path,
    launch: Launcher,
    routine: ServerRoutine,
    options: object,
    checkpointed: bool = False,
) -> dict:
    """Prune the model with ``routine`` over the federation that ``launch`` provides; with
    ``checkpointed`` (a resumable protocol) every block is checkpointed, and ``resume=true`` continues
    from the checkpoint."""
    saved = checkpoint.begin(out_dir, job)
    checkpoints = RunCheckpoints(out_dir, job, saved) if checkpointed and resumable(job) else None
    prep = prepare(job)
    blocks = prep.pruning_blocks(out_dir)
    try:
        metrics = _run_federated(job, out_dir, launch, routine, options, prep, blocks, checkpoints)
    finally:
        discard_(blocks)
    checkpoint.clear(out_dir)  # outputs complete: nothing left to resume
    return metrics


def run_key(saved: Checkpoint | None) -> str:
    """The key the sites keep this run's state under: the checkpoint's when resuming (so sites that kept
    their state continue), else a fresh one (a new run never meets a killed run's site state)."""
    return saved.run_key if saved is not None else uuid.uuid4().hex[:12]


def _run_federated(
    job: JobConfig,
    out_dir: Path,
    launch: Launcher,
    routine: ServerRoutine,
    options: object,
    prep: Prepared,
    blocks: BlockAccess,
    checkpoints: RunCheckpoints | None = None,
) -> dict:
    """:func:`run_federated` once the job is prepared; the server decides the blocks through ``blocks``."""
    fed_job = FederatedJob(
        model=prep.model,
        pruner=prep.pruner,
        method=MethodSpec.from_job(job, prep.pruner),
        pattern=prep.pattern,
        site_job=SiteJob.from_job(job, run_key(checkpoints.saved if checkpoints is not None else None)),
        options=options,
        seed=job.seed,
        progress=job.progress,
        privacy=job.privacy.name,
        plan=plan_from_job(job, prep.model),
        blocks=blocks,
        structure=prep.structure,
        allocation=job.allocation.rule(),
        checks=SiteChecks(job.federation.robust, job.federation.robust_scale),
        checkpoints=checkpoints,
        roster=roster_from_job(job),
    )
    result: dict = {}

    def server_main(fed: Federation) -> None:
        result["outcome"] = routine(fed, fed_job)
        result["fed"] = fed
        clock.stop_cpu()  # while the simulation's site processes are alive (their CPU time counts)

    clock = StepClock()
    launch(server_main)
    clock.stop()
    if "outcome" not in result:
        raise RuntimeError("the federated run ended without a result (see the log above)")
    outcome: FederatedOutcome = result["outcome"]
    fed: Federation = result["fed"]
    prep.pruned_(blocks)
    pruned = prep.evaluate(job, "pruned")
    extra = {}
    if outcome.allocation is not None:
        extra.update(allocation_metrics(outcome.allocation), allocation_sites=list(outcome.allocation_sites))
    if len(set(outcome.sites_per_sum)) > 1:
        extra["sites_per_sum"] = [list(sites) for sites in outcome.sites_per_sum]
    if job.federation.robust:  # the rejected sites' statistics failed checks against the median site
        extra.update(robust=True, robust_scale=job.federation.robust_scale)
    if fed_job.plan is not None and fed_job.plan.dp_sigma > 0:
        extra["dp_rho_spent"] = {str(node): rho for node, rho in sorted(outcome.dp_rho_spent.items())}
    if outcome.depth_sites is not None:  # structured depth pruning chosen from these sites' data
        extra["depth_sites"] = list(outcome.depth_sites)
    if checkpoints is not None and checkpoints.saved is not None:  # resume=true: timings from here on
        extra["resumed_after_block"] = checkpoints.saved.blocks[-1]
    metrics = base_metrics(
        job,
        prep,
        pruned.value,
        outcome.calib_tokens,
        num_clients=len(outcome.final_sites),
        partition=job.federation.partitioner,
        **protocol_metrics(options),
        rounds=len(fed.round_seconds),
        round_wall_s=[round(s, 3) for s in fed.round_seconds],
        bytes_up_per_client=fed.mean_bytes(fed.bytes_up),
        bytes_down_per_client=fed.mean_bytes(fed.bytes_down),
        rejected=[{"round": r, "node": n, "reason": why} for r, n, why in fed.rejected],
        **clock.metrics(),
        **extra,
        **privacy_metrics(fed_job.privacy, fed_job.plan),
    )
    if outcome.votes and getattr(options, "save_votes", False):
        metrics["vote_sites"] = outcome.vote_sites
        save_tensors_atomic(out_dir / "votes.safetensors", outcome.votes)
    model = prep.model if job.save_model else None
    files, config = prep.model_files, prep.config_updates
    write_outputs(out_dir, metrics, outcome.layer_sparsity, model, prep.tokenizer, blocks, files, config)
    return metrics


def protocol_metrics(options: object) -> dict:
    """``group`` and ``scaling`` of the voting protocols (None for the others)."""
    return {"group": getattr(options, "group", None), "scaling": getattr(options, "scaling", None)}
