"""``centralized``: all sites' calibration windows pooled, no federation (the reference)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

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


def run_centralized(job: JobConfig, out_dir: Path, launch=None) -> dict:
    """Prune the model on the pooled calibration windows; evaluate dense and pruned; write outputs."""
    prep = prepare(job)
    calib_ids = calibration_windows(job, prep.data.calib_docs)
    blocks = prep.pruning_blocks(out_dir)
    try:
        clock = StepClock()
        report = prune_with_job_(job, prep, prep.model, calib_ids, blocks)
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
        )
        model = prep.model if job.save_model else None
        files, config = prep.model_files, prep.config_updates
        write_outputs(out_dir, metrics, report.layer_sparsity, model, prep.tokenizer, blocks, files, config)
    finally:
        discard_(blocks)
    return metrics


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
    )
)
