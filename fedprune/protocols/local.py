"""``local`` (FedPrLLM baseline): each site prunes alone on its own windows; no communication.

Reports every site's pruned perplexity on the held-out works and their mean (``ppl_pruned``). The saved
model, if any, is site 0's (with ``pattern=structured`` each site removes whole units on its own; the
structured metrics and the saved model's shapes are site 0's; with ``structured.blocks`` /
``structured.attention`` each site removes the blocks and attention sublayers of its own influence sums).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from fedprune.config import JobConfig
from fedprune.data.sites import site_windows
from fedprune.job import base_metrics, evaluate, prepare, prune_with_job_, summary_table, write_outputs
from fedprune.protocols.centralized import NoOptions, check_llm
from fedprune.protocols.registry import ProtocolUnit, register_protocol
from fedprune.sequential import ResidentBlocks

logger = logging.getLogger(__name__)


def run_local(job: JobConfig, out_dir: Path, launch=None) -> dict:
    """Prune one copy per site on that site's windows; evaluate each."""
    prep = prepare(job)
    fed, data = job.federation, job.data
    per_site, first, calib_tokens = [], None, 0
    for site in range(fed.num_clients):
        ids = site_windows(
            fed.partitioner,
            prep.data.calib_docs,
            site,
            fed.num_clients,
            data.calib_windows,
            data.seq_len,
            job.seed,
        )
        local = copy.deepcopy(prep.model)
        report = prune_with_job_(job, prep, local, ids)
        calib_tokens += report.calib_tokens
        per_site.append(evaluate(job, local, prep.data.eval_ids, f"site {site} pruned").value)
        if first is None:
            first = (local, report)
    local, report = first
    prep.model = local  # the reported sparsity and saved model are site 0's
    prep.pruned_(ResidentBlocks(local))
    metrics = base_metrics(
        job,
        prep,
        sum(per_site) / len(per_site),
        calib_tokens,
        ppl_per_client=per_site,
        num_clients=fed.num_clients,
        partition=fed.partitioner,
        rounds=0,
        bytes_up_per_client=0,
        bytes_down_per_client=0,
    )
    model = local if job.save_model else None
    write_outputs(out_dir, metrics, report.layer_sparsity, model, prep.tokenizer, None, prep.model_files)
    return metrics


UNIT = register_protocol(
    ProtocolUnit(
        "local", NoOptions, run_local, check_llm, summary_table, structured=True, depth=True, allocation=True
    )
)
