"""The centralized protocol: all sites' calibration windows pooled, no federation (the reference)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from cli.common import base_metrics, calibration_windows, evaluate, prepare, target_sparsity, write_outputs
from fedprune.sequential import prune_model_

logger = logging.getLogger(__name__)


def run_centralized(cfg: DictConfig, out_dir: Path) -> dict:
    """Prune the model on the pooled calibration windows; evaluate dense and pruned; write outputs."""
    prep = prepare(cfg)
    calib_ids = calibration_windows(cfg, prep.data.calib_docs)
    prune_start = time.perf_counter()
    report = prune_model_(
        prep.model,
        calib_ids,
        prep.pruner,
        target_sparsity(cfg),
        prep.pattern,
        int(cfg.batch_size),
        bool(cfg.progress),
    )
    prune_s = time.perf_counter() - prune_start
    pruned = evaluate(cfg, prep.model, prep.data.eval_ids, "pruned")
    metrics = base_metrics(
        cfg, prep, pruned.value, report.calib_tokens, calib_windows=int(calib_ids.shape[0]), prune_s=prune_s
    )
    write_outputs(
        out_dir, metrics, report.layer_sparsity, prep.model if cfg.save_model else None, prep.tokenizer
    )
    return metrics
