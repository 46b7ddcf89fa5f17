"""``centralized``: all sites' calibration windows pooled, no federation (the reference)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from fedprune import checkpoint
from fedprune.checkpoint import Checkpoint, restore_block_
from fedprune.config import JobConfig, check_llm_federation, check_llm_job
from fedprune.job import (
    allocation_metrics,
    base_metrics,
    calibration_windows,
    discard_,
    prepare,
    prune_with_job_,
    summary_table,
    write_outputs,
)
from fedprune.protocols.registry import ProtocolUnit, parse_options, register_protocol
from fedprune.sequential import PruneReport
from fedprune.timing import StepClock

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NoOptions:
    """A protocol without options of its own."""

    @classmethod
    def from_options(cls, options) -> NoOptions:
        return parse_options(cls, options)


def check_llm(job: JobConfig) -> None:
    """The LLM checks, and sites that the (pooled) windows can be dealt to."""
    check_llm_job(job)
    check_llm_federation(job)


@dataclass
class CentralCheckpoints:
    """A centralized run's per-block checkpoints (:class:`fedprune.sequential.BlockCheckpoints`): each
    pruned block's tensors and the report so far; ``saved``: the checkpoint a resumed run restores."""

    out_dir: Path
    job: JobConfig
    saved: Checkpoint | None = None
    done: list[int] = field(default_factory=list)

    @property
    def finished(self) -> int:
        return len(self.saved.blocks) if self.saved is not None else 0

    def restore_(self, index: int, block: nn.Module, report: PruneReport) -> None:
        restore_block_(block, self.saved.tensors(index))
        report.layer_sparsity = dict(self.saved.state["layer_sparsity"])
        report.ignored_layers = list(self.saved.state["ignored_layers"])
        self.done.append(index)

    def save(self, index: int, block: nn.Module, report: PruneReport) -> None:
        checkpoint.save_block(self.out_dir, index, block)
        self.done.append(index)
        state = {"layer_sparsity": report.layer_sparsity, "ignored_layers": report.ignored_layers}
        checkpoint.save_state(self.out_dir, self.job, "", self.done, state)


def run_centralized(job: JobConfig, out_dir: Path, launch=None) -> dict:
    """Prune the model on the pooled calibration windows; evaluate dense and pruned; write outputs.

    A checkpoint is written after every block; ``resume=true`` continues from it (the inputs of the
    next block come from forwarding the calibration windows through the restored pruned blocks)."""
    saved = checkpoint.begin(out_dir, job)
    checkpoints = CentralCheckpoints(out_dir, job, saved) if resumable(job) else None
    prep = prepare(job)
    calib_ids = calibration_windows(job, prep.data.calib_docs)
    blocks = prep.pruning_blocks(out_dir)
    try:
        clock = StepClock()
        report = prune_with_job_(job, prep, prep.model, calib_ids, blocks, checkpoints)
        clock.stop()
        prep.pruned_(blocks)
        pruned = prep.evaluate(job, "pruned")
        metrics = base_metrics(
            job,
            prep,
            pruned.value,
            report.calib_tokens,
            calib_windows=int(calib_ids.shape[0]),
            **allocation_metrics(report.allocation),
            **clock.metrics(),
            **({"resumed_after_block": saved.blocks[-1]} if saved is not None else {}),
        )
        model = prep.model if job.save_model else None
        files, config = prep.model_files, prep.config_updates
        write_outputs(out_dir, metrics, report.layer_sparsity, model, prep.tokenizer, blocks, files, config)
        checkpoint.clear(out_dir)  # outputs complete: nothing left to resume
    finally:
        discard_(blocks)
    return metrics


def resumable(job: JobConfig) -> bool:
    """Whether a run of ``job`` can be resumed (so writes checkpoints): not structured or offloaded."""
    return job.pattern != "structured" and not job.model.offload


UNIT = register_protocol(
    ProtocolUnit(
        "centralized",
        NoOptions,
        run_centralized,
        check_llm,
        summary_table,
        offload=True,
        structured=True,
        depth=True,
        allocation=True,
        resumable=True,
    )
)
