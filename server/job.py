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

from cli.common import base_metrics, evaluate, prepare, privacy_metrics, target_sparsity, write_outputs
from fedprune.outputs import save_tensors_atomic
from server.rounds import Federation
from server.secure_rounds import plan_from_config
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
    prep = prepare(cfg)
    pruner_params = OmegaConf.to_container(cfg.pruner.get("params", {}), resolve=True)
    voting = "mask_vote" in str(cfg.protocol.name)
    job = FederatedJob(
        model=prep.model,
        pruner=prep.pruner,
        pruner_params=pruner_params,
        sparsity=target_sparsity(cfg),
        pattern=prep.pattern,
        group=str(cfg.protocol.get("group", "layer")),
        scaling=bool(cfg.protocol.get("scaling", False)),
        seed=int(cfg.seed),
        site_config=site_config(cfg, uuid.uuid4().hex[:12]),
        progress=bool(cfg.progress),
        privacy=str(cfg.privacy.name),
        plan=plan_from_config(cfg, prep.model),
    )
    result: dict = {}

    def server_main(grid: Grid) -> None:
        nodes = wait_for_nodes(grid, int(cfg.federation.num_clients))
        timeout = cfg.federation.get("round_timeout")
        timeout = None if timeout is None else float(timeout)
        fed = Federation(grid, nodes, int(cfg.federation.min_clients), timeout)
        result["outcome"] = WORKFLOWS[str(cfg.protocol.name)](fed, job)
        result["fed"] = fed

    federated_start = time.perf_counter()
    launch(server_main)
    if "outcome" not in result:
        raise RuntimeError("the federated run ended without a result (see the log above)")
    federated_s = time.perf_counter() - federated_start
    outcome: FederatedOutcome = result["outcome"]
    fed: Federation = result["fed"]
    pruned = evaluate(cfg, prep.model, prep.data.eval_ids, "pruned")
    metrics = base_metrics(
        cfg,
        prep,
        pruned.value,
        outcome.calib_tokens,
        num_clients=outcome.num_clients,
        partition=str(cfg.federation.partitioner),
        group=job.group if voting else None,
        scaling=job.scaling if voting else None,
        rounds=len(fed.round_seconds),
        round_wall_s=[round(s, 3) for s in fed.round_seconds],
        bytes_up_per_client=fed.mean_bytes(fed.bytes_up),
        bytes_down_per_client=fed.mean_bytes(fed.bytes_down),
        rejected=[{"round": r, "node": n, "reason": why} for r, n, why in fed.rejected],
        prune_s=federated_s,
        **privacy_metrics(job.privacy, job.plan),
    )
    if outcome.votes and cfg.protocol.get("save_votes", False):
        metrics["vote_sites"] = outcome.vote_sites
        save_tensors_atomic(out_dir / "votes.safetensors", outcome.votes)
    model = prep.model if cfg.save_model else None
    write_outputs(out_dir, metrics, outcome.layer_sparsity, model, prep.tokenizer)
    return metrics
