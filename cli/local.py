"""The ``local`` baseline (FedPrLLM): each site prunes alone on its own windows; no communication.

Reports every site's pruned perplexity on the held-out works and their mean (``ppl_pruned``). The saved
model, if any, is site 0's.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from cli.common import evaluate, load_model_and_tokenizer, load_run_data, target_sparsity, write_outputs
from fedprune.data.sites import site_windows
from fedprune.masks import parse_pattern
from fedprune.outputs import peak_rss_mb
from fedprune.pruners import get_pruner
from fedprune.sequential import prune_model_

logger = logging.getLogger(__name__)


def run_local(cfg: DictConfig, out_dir: Path) -> dict:
    """Prune one copy per site on that site's windows; evaluate each."""
    start = time.perf_counter()
    pruner = get_pruner(cfg.pruner.name, **cfg.pruner.get("params", {}))
    pattern = parse_pattern(str(cfg.pattern))
    model, tokenizer, _ = load_model_and_tokenizer(cfg)
    data = load_run_data(cfg, tokenizer)
    dense = evaluate(cfg, model, data.eval_ids, "dense")
    sites = int(cfg.federation.num_clients)
    per_site, first, calib_tokens = [], None, 0
    for site in range(sites):
        ids = site_windows(
            str(cfg.federation.partitioner),
            data.calib_docs,
            site,
            sites,
            int(cfg.data.calib_windows),
            int(cfg.data.seq_len),
            int(cfg.seed),
        )
        local = copy.deepcopy(model)
        report = prune_model_(
            local, ids, pruner, target_sparsity(cfg), pattern, int(cfg.batch_size), bool(cfg.progress)
        )
        calib_tokens += report.calib_tokens
        per_site.append(evaluate(cfg, local, data.eval_ids, f"site {site} pruned").value)
        if first is None:
            first = (local, report)
    local, report = first
    metrics = {
        "model": str(cfg.model.name),
        "protocol": "local",
        "pruner": pruner.name,
        "pattern": str(pattern),
        "sparsity": target_sparsity(cfg),
        "sparsity_actual": report.sparsity,
        "ppl_dense": dense.value,
        "ppl_pruned": sum(per_site) / len(per_site),
        "ppl_per_client": per_site,
        "calib_tokens": calib_tokens,
        "eval_tokens": dense.tokens,
        "num_clients": sites,
        "partition": str(cfg.federation.partitioner),
        "rounds": 0,
        "bytes_up_per_client": 0,
        "bytes_down_per_client": 0,
        "wall_s": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
        "seed": int(cfg.seed),
    }
    write_outputs(out_dir, metrics, report.layer_sparsity, local if cfg.save_model else None, tokenizer)
    return metrics
