"""The centralized protocol: all calibration windows in one place, no federation (the reference)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from cli.common import (
    calibration_windows,
    evaluate,
    load_model_and_tokenizer,
    load_run_data,
    target_sparsity,
    write_outputs,
)
from fedprune.masks import parse_pattern
from fedprune.outputs import peak_rss_mb
from fedprune.pruners import get_pruner
from fedprune.sequential import prune_model_

logger = logging.getLogger(__name__)


def run_centralized(cfg: DictConfig, out_dir: Path) -> dict:
    """Prune the model on pooled calibration windows; evaluate dense and pruned; write outputs."""
    start = time.perf_counter()
    pruner = get_pruner(cfg.pruner.name, **cfg.pruner.get("params", {}))
    pattern = parse_pattern(str(cfg.pattern))
    model, tokenizer, _ = load_model_and_tokenizer(cfg)
    data = load_run_data(cfg, tokenizer)
    calib_ids = calibration_windows(cfg, data.calib_docs)
    dense = evaluate(cfg, model, data.eval_ids, "dense")
    prune_start = time.perf_counter()
    report = prune_model_(
        model,
        calib_ids,
        pruner,
        target_sparsity(cfg),
        pattern,
        int(cfg.batch_size),
        bool(cfg.progress),
    )
    prune_s = time.perf_counter() - prune_start
    pruned = evaluate(cfg, model, data.eval_ids, "pruned")
    metrics = {
        "model": str(cfg.model.name),
        "protocol": "centralized",
        "pruner": pruner.name,
        "pattern": str(pattern),
        "sparsity": target_sparsity(cfg),
        "sparsity_actual": report.sparsity,
        "ppl_dense": dense.value,
        "ppl_pruned": pruned.value,
        "calib_tokens": report.calib_tokens,
        "calib_windows": int(calib_ids.shape[0]),
        "eval_tokens": pruned.tokens,
        "prune_s": prune_s,
        "wall_s": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
        "seed": int(cfg.seed),
    }
    write_outputs(out_dir, metrics, report.layer_sparsity, model if cfg.save_model else None, tokenizer)
    return metrics
