"""The ``local`` baseline (FedPrLLM): each site prunes alone on its own windows; no communication.

Reports every site's pruned perplexity on the held-out works and their mean (``ppl_pruned``). The saved
model, if any, is site 0's.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from omegaconf import DictConfig

from cli.common import base_metrics, evaluate, prepare, target_sparsity, write_outputs
from fedprune.data.sites import site_windows
from fedprune.sequential import prune_model_

logger = logging.getLogger(__name__)


def run_local(cfg: DictConfig, out_dir: Path) -> dict:
    """Prune one copy per site on that site's windows; evaluate each."""
    prep = prepare(cfg)
    sites = int(cfg.federation.num_clients)
    per_site, first, calib_tokens = [], None, 0
    for site in range(sites):
        ids = site_windows(
            str(cfg.federation.partitioner),
            prep.data.calib_docs,
            site,
            sites,
            int(cfg.data.calib_windows),
            int(cfg.data.seq_len),
            int(cfg.seed),
        )
        local = copy.deepcopy(prep.model)
        report = prune_model_(
            local,
            ids,
            prep.pruner,
            target_sparsity(cfg),
            prep.pattern,
            int(cfg.batch_size),
            bool(cfg.progress),
        )
        calib_tokens += report.calib_tokens
        per_site.append(evaluate(cfg, local, prep.data.eval_ids, f"site {site} pruned").value)
        if first is None:
            first = (local, report)
    local, report = first
    prep.model = local  # the reported sparsity and saved model are site 0's
    metrics = base_metrics(
        cfg,
        prep,
        sum(per_site) / len(per_site),
        calib_tokens,
        ppl_per_client=per_site,
        num_clients=sites,
        partition=str(cfg.federation.partitioner),
        rounds=0,
        bytes_up_per_client=0,
        bytes_down_per_client=0,
    )
    write_outputs(out_dir, metrics, report.layer_sparsity, local if cfg.save_model else None, prep.tokenizer)
    return metrics
