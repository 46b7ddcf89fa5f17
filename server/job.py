"""A federated pruning job around a Flower Grid: evaluate dense, run the protocol, evaluate, write outputs.

The same function serves the Simulation Engine (``cli/federated.py`` launches it inside a ServerApp run
by ``run_simulation``) and the Deployment Engine (``server/server_app.py``, under ``flwr run``).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from flwr.serverapp import Grid
from omegaconf import DictConfig, OmegaConf

from cli.common import evaluate, load_model_and_tokenizer, load_run_data, target_sparsity, write_outputs
from fedprune.masks import parse_pattern
from fedprune.outputs import peak_rss_mb
from fedprune.pruners import get_pruner
from server.rounds import Federation
from server.workflows import WORKFLOWS, FederatedJob, FederatedOutcome

logger = logging.getLogger(__name__)

Launcher = Callable[[Callable[[Grid], None]], None]


def site_config(cfg: DictConfig, run_key: str) -> dict:
    """The few parameters every site needs, sent in each message (flat, Flower ConfigRecord values)."""
    return {
        "run_key": run_key,
        "model": str(cfg.model.path),
        "dtype": str(cfg.model.get("dtype", "float32")),
        "corpus": str(cfg.data.path),
        "heldout": [str(w) for w in cfg.data.heldout],
        "seq_len": int(cfg.data.seq_len),
        "total_windows": int(cfg.data.calib_windows),
        "partitioner": str(cfg.federation.partitioner),
        "num_sites": int(cfg.federation.num_clients),
        "seed": int(cfg.seed),
        "batch_size": int(cfg.batch_size),
    }


def wait_for_nodes(grid: Grid, count: int, timeout_s: float = 120.0) -> list[int]:
    """The first ``count`` node ids (sorted) once that many have connected."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes[:count]
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {count} sites connected within {timeout_s:.0f} s")
        time.sleep(0.5)


def run_federated(cfg: DictConfig, out_dir: Path, launch: Launcher) -> dict:
    """Prune the model with the configured protocol over the grid that ``launch`` provides."""
    start = time.perf_counter()
    pruner_params = OmegaConf.to_container(cfg.pruner.get("params", {}), resolve=True)
    pruner = get_pruner(cfg.pruner.name, **pruner_params)
    pattern = parse_pattern(str(cfg.pattern))
    model, tokenizer, _ = load_model_and_tokenizer(cfg)
    data = load_run_data(cfg, tokenizer)
    dense = evaluate(cfg, model, data.eval_ids, "dense")
    job = FederatedJob(
        model=model,
        pruner=pruner,
        pruner_params=pruner_params,
        sparsity=target_sparsity(cfg),
        pattern=pattern,
        group=str(cfg.protocol.get("group", "layer")),
        scaling=bool(cfg.protocol.get("scaling", False)),
        seed=int(cfg.seed),
        site_config=site_config(cfg, uuid.uuid4().hex[:12]),
        progress=bool(cfg.progress),
    )
    result: dict = {}

    def server_main(grid: Grid) -> None:
        nodes = wait_for_nodes(grid, int(cfg.federation.num_clients))
        timeout = cfg.federation.get("round_timeout")
        fed = Federation(
            grid, nodes, int(cfg.federation.min_clients), None if timeout is None else float(timeout)
        )
        result["outcome"] = WORKFLOWS[str(cfg.protocol.name)](fed, job)
        result["fed"] = fed

    federated_start = time.perf_counter()
    launch(server_main)
    if "outcome" not in result:
        raise RuntimeError("the federated run ended without a result (see the log above)")
    federated_s = time.perf_counter() - federated_start
    outcome: FederatedOutcome = result["outcome"]
    fed: Federation = result["fed"]
    pruned = evaluate(cfg, model, data.eval_ids, "pruned")
    weights = {k: 1 for k in outcome.layer_sparsity}
    metrics = {
        "model": str(cfg.model.name),
        "protocol": str(cfg.protocol.name),
        "pruner": pruner.name,
        "pattern": str(pattern),
        "sparsity": target_sparsity(cfg),
        "sparsity_actual": _weighted_sparsity(model, outcome, weights),
        "ppl_dense": dense.value,
        "ppl_pruned": pruned.value,
        "calib_tokens": outcome.calib_tokens,
        "eval_tokens": pruned.tokens,
        "num_clients": outcome.num_clients,
        "partition": str(cfg.federation.partitioner),
        "group": job.group if "mask_vote" in str(cfg.protocol.name) else None,
        "scaling": job.scaling if "mask_vote" in str(cfg.protocol.name) else None,
        "rounds": len(fed.round_seconds),
        "round_wall_s": [round(s, 3) for s in fed.round_seconds],
        "bytes_up_per_client": fed.mean_bytes(fed.bytes_up),
        "bytes_down_per_client": fed.mean_bytes(fed.bytes_down),
        "rejected": [{"round": r, "node": n, "reason": why} for r, n, why in fed.rejected],
        "prune_s": federated_s,
        "wall_s": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
        "seed": int(cfg.seed),
    }
    write_outputs(out_dir, metrics, outcome.layer_sparsity, model if cfg.save_model else None, tokenizer)
    return metrics


def _weighted_sparsity(model, outcome: FederatedOutcome, _weights: dict) -> float:
    """Fraction of zero weights over all prunable layers of the pruned model."""
    from fedprune.models import find_blocks, find_prunable_layers

    _, blocks = find_blocks(model)
    zeros = total = 0
    for block in blocks:
        for layer in find_prunable_layers(block).values():
            zeros += int((layer.weight == 0).sum())
            total += layer.weight.numel()
    return zeros / total if total else 0.0
