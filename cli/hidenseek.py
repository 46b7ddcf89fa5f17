"""``protocol=hidenseek``: HideNseek and its baselines on digits over a Flower federation.

The server builds the seeded random network, prunes it without data (``protocol.prune``: SynFlow,
magnitude or random, at ``protocol.density``), then runs ``protocol.rounds`` rounds
(``server/hidenseek_workflow.py``) of ``protocol.variant``:

``sign_supermask``    HideNseek: sites learn a sign per kept frozen weight, upload 1 bit per kept weight.
``binary_supermask``  sites learn keep/drop (``{0, 1}``) per kept frozen weight, 1 bit per kept weight.
``fedavg_dense``      FedAvg of all weights (float32 up and down); ``density`` and ``prune`` unused.
``fedavg_pruned``     FedAvg of the pruned subnetwork's kept weights (pruned ones stay 0).

Writes ``metrics.json`` (accuracy per round, bytes up/down per site per round, wall time) and
``accuracy.png`` (accuracy vs round and vs cumulative upload bytes), atomically, ``metrics.json`` last.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from cli.validate import ConfigError, validate_sites
from fedprune.hidenseek.baseline_masks import magnitude_masks_at_init, random_masks
from fedprune.hidenseek.data import load_digits_split
from fedprune.hidenseek.models import INIT_SCHEMES, build_model, masks_density, prunable_weights
from fedprune.hidenseek.synflow import synflow_masks
from fedprune.outputs import peak_rss_mb, write_json_atomic

logger = logging.getLogger(__name__)

VARIANTS = ("sign_supermask", "binary_supermask", "fedavg_dense", "fedavg_pruned")
PRUNE_METHODS = ("synflow", "magnitude", "random")
AGGREGATIONS = ("vote", "score_average", "score_delta")
ARCHS = ("mlp", "cnn")
OPTIMIZERS = ("sgd", "adam")
PLOT_NAME = "accuracy.png"


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")


def _one_of(value: object, key: str, known: tuple[str, ...]) -> None:
    _check(str(value) in known, key, f"must be one of {known}, got {value!r}")


def validate_hidenseek(cfg: DictConfig) -> None:
    """Checks of ``protocol=hidenseek`` and the ``federation`` group (no model or corpus involved)."""
    p = cfg.protocol
    _one_of(p.variant, "protocol.variant", VARIANTS)
    _one_of(p.model, "protocol.model", ARCHS)
    _one_of(p.init, "protocol.init", INIT_SCHEMES)
    _one_of(p.prune, "protocol.prune", PRUNE_METHODS)
    _one_of(p.aggregation, "protocol.aggregation", AGGREGATIONS)
    _one_of(p.optimizer, "protocol.optimizer", OPTIMIZERS)
    _check(0.0 < float(p.density) <= 1.0, "protocol.density", f"must be in (0, 1], got {p.density}")
    _check(float(p.alpha) > 0.0, "protocol.alpha", f"must be > 0, got {p.alpha}")
    _check(int(p.hidden) >= 1, "protocol.hidden", f"must be >= 1, got {p.hidden}")
    _check(int(p.rounds) >= 1, "protocol.rounds", f"must be >= 1, got {p.rounds}")
    _check(int(p.local_epochs) >= 1, "protocol.local_epochs", f"must be >= 1, got {p.local_epochs}")
    _check(int(p.batch_size) >= 1, "protocol.batch_size", f"must be >= 1, got {p.batch_size}")
    _check(float(p.lr) > 0.0, "protocol.lr", f"must be > 0, got {p.lr}")
    _check(float(p.fedavg_lr) > 0.0, "protocol.fedavg_lr", f"must be > 0, got {p.fedavg_lr}")
    _check(0.0 <= float(p.momentum) < 1.0, "protocol.momentum", f"must be in [0, 1), got {p.momentum}")
    _check(float(p.init_scale) > 0.0, "protocol.init_scale", f"must be > 0, got {p.init_scale}")
    _check(float(p.server_lr) > 0.0, "protocol.server_lr", f"must be > 0, got {p.server_lr}")
    _check(
        0.0 < float(p.delta_clip_quantile) <= 1.0,
        "protocol.delta_clip_quantile",
        f"must be in (0, 1], got {p.delta_clip_quantile}",
    )
    _check(
        0.0 <= float(p.delta_topk) < 1.0, "protocol.delta_topk", f"must be in [0, 1), got {p.delta_topk}"
    )
    _check(int(p.synflow_iterations) >= 1, "protocol.synflow_iterations", "must be >= 1")
    _check(0.0 < float(p.test_fraction) < 1.0, "protocol.test_fraction", "must be in (0, 1)")
    _check(int(p.min_client_samples) >= 1, "protocol.min_client_samples", "must be >= 1")
    _check(
        str(p.aggregation) == "vote" or str(p.variant) in ("sign_supermask", "binary_supermask"),
        "protocol.aggregation",
        "score_average and score_delta apply to the supermask variants only",
    )
    validate_sites(cfg)


def prune_at_init(model: torch.nn.Module, method: str, density: float, iterations: int, seed: int):
    """The server's data-free keep-masks: ``"<module>.weight" -> bool``."""
    if method == "synflow":
        return synflow_masks(model, density, iterations=iterations)
    if method == "magnitude":
        return magnitude_masks_at_init(model, density)
    return random_masks(model, density, seed)


def site_config(cfg: DictConfig) -> dict:
    """What every site needs, sent in each message (flat ConfigRecord values)."""
    p = cfg.protocol
    fedavg = str(p.variant).startswith("fedavg")
    return {
        "variant": str(p.variant),
        "aggregation": str(p.aggregation),
        "arch": str(p.model),
        "hidden": int(p.hidden),
        "init": str(p.init),
        "model_seed": int(cfg.seed),
        "data_seed": int(cfg.seed),
        "seed": int(cfg.seed),
        "test_fraction": float(p.test_fraction),
        "alpha": float(p.alpha),
        "min_size": int(p.min_client_samples),
        "epochs": int(p.local_epochs),
        "lr": float(p.fedavg_lr if fedavg else p.lr),
        "momentum": float(p.momentum),
        "batch_size": int(p.batch_size),
        "init_scale": float(p.init_scale),
        "optimizer": str(p.optimizer),
        "delta_clip_quantile": float(p.delta_clip_quantile),
        "delta_topk": float(p.delta_topk),
    }


def build_job(cfg: DictConfig):
    """The server's model, masks and test split, as a :class:`HideNseekJob`."""
    from server.hidenseek_workflow import HideNseekJob

    p = cfg.protocol
    model = build_model(str(p.model), int(cfg.seed), str(p.init), hidden=int(p.hidden))
    if str(p.variant) == "fedavg_dense":
        masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in prunable_weights(model).items()}
    else:
        masks = prune_at_init(model, str(p.prune), float(p.density), int(p.synflow_iterations), int(cfg.seed))
    split = load_digits_split(float(p.test_fraction), int(cfg.seed))
    return HideNseekJob(
        variant=str(p.variant),
        aggregation=str(p.aggregation),
        base_model=model,
        masks=masks,
        rounds=int(p.rounds),
        init_scale=float(p.init_scale),
        server_lr=float(p.server_lr),
        site_config=site_config(cfg),
        x_test=split.x_test,
        y_test=split.y_test,
    )


def write_plot_atomic(path: Path, accuracy: list[float], cumulative_up: list[float], title: str) -> None:
    """Accuracy vs round and vs cumulative upload bytes per site, as a PNG (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(range(len(accuracy)), accuracy, marker="o")
    left.set_xlabel("round")
    left.set_ylabel("test accuracy")
    right.plot(cumulative_up, accuracy, marker="o")
    right.set_xlabel("cumulative upload bytes per site")
    right.set_xscale("symlog")
    for axis in (left, right):
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)


def outcome_metrics(cfg: DictConfig, job, outcome, fed, wall_s: float) -> dict:
    """``metrics.json``: config, accuracy per round, bytes per site per round (by partition id)."""
    p = cfg.protocol
    records = outcome.records[1:]
    up = [float(np.mean(list(r.bytes_up.values()))) for r in records]
    down = [float(np.mean(list(r.bytes_down.values()))) for r in records]
    total = sum(mask.numel() for mask in job.masks.values())
    return {
        "protocol": "hidenseek",
        "variant": job.variant,
        "aggregation": job.aggregation,
        "model": str(p.model),
        "hidden": int(p.hidden),
        "prune": "none" if job.variant == "fedavg_dense" else str(p.prune),
        "density": float(p.density) if job.variant != "fedavg_dense" else 1.0,
        "density_actual": masks_density(job.masks),
        "kept_weights": sum(int(mask.sum()) for mask in job.masks.values()),
        "total_weights": total,
        "alpha": float(p.alpha),
        "num_clients": int(cfg.federation.num_clients),
        "rounds": job.rounds,
        "local_epochs": int(p.local_epochs),
        "lr": job.site_config["lr"],
        "server_lr": job.server_lr,
        "delta_clip_quantile": job.site_config["delta_clip_quantile"],
        "delta_topk": job.site_config["delta_topk"],
        "accuracy": [r.accuracy for r in outcome.records],
        "final_accuracy": outcome.records[-1].accuracy,
        "bytes_up_per_client_per_round": [
            {str(k): v for k, v in sorted(r.bytes_up.items())} for r in records
        ],
        "bytes_down_per_client_per_round": [
            {str(k): v for k, v in sorted(r.bytes_down.items())} for r in records
        ],
        "mean_bytes_up_per_client_round": float(np.mean(up)),
        "mean_bytes_down_per_client_round": float(np.mean(down)),
        "round_wall_s": [round(r.wall_s, 3) for r in records],
        "rejected": [{"round": r, "node": n, "reason": why} for r, n, why in fed.rejected],
        "wall_s": wall_s,
        "peak_rss_mb": peak_rss_mb(),
        "seed": int(cfg.seed),
    }


Launcher = Callable[[Callable], None]


def run_hidenseek(cfg: DictConfig, out_dir: Path, launch: Launcher | None = None) -> dict:
    """Run ``protocol=hidenseek`` over the grid ``launch`` gives (default: a Flower simulation)."""
    from server.hidenseek_workflow import run_hidenseek_rounds
    from server.job import wait_for_nodes
    from server.rounds import Federation

    validate_hidenseek(cfg)
    start = time.perf_counter()
    torch.manual_seed(int(cfg.seed))
    job = build_job(cfg)
    if launch is None:
        from cli.federated import simulation_launcher

        launch = simulation_launcher(cfg)
    result: dict = {}

    def server_main(grid) -> None:
        nodes = wait_for_nodes(grid, int(cfg.federation.num_clients))
        timeout = cfg.federation.get("round_timeout")
        fed = Federation(
            grid, nodes, int(cfg.federation.min_clients), None if timeout is None else float(timeout)
        )
        result["outcome"] = run_hidenseek_rounds(fed, job)
        result["fed"] = fed

    launch(server_main)
    if "outcome" not in result:
        raise RuntimeError("the federated run ended without a result (see the log above)")
    metrics = outcome_metrics(cfg, job, result["outcome"], result["fed"], time.perf_counter() - start)
    cumulative = np.cumsum(
        [0.0, *[sum(r.bytes_up.values()) / max(1, len(r.bytes_up)) for r in result["outcome"].records[1:]]]
    )
    title = f"{job.variant}, density {metrics['density']}, alpha {metrics['alpha']}"
    write_plot_atomic(Path(out_dir) / PLOT_NAME, metrics["accuracy"], cumulative.tolist(), title)
    write_json_atomic(Path(out_dir) / "metrics.json", metrics)
    return metrics


def summary_table(metrics: dict) -> str:
    """A short summary for the terminal."""
    rows = [
        ("protocol / variant", f"hidenseek / {metrics['variant']}"),
        ("model", f"{metrics['model']} ({metrics['kept_weights']} of {metrics['total_weights']} kept)"),
        ("accuracy round 0", f"{metrics['accuracy'][0]:.4f}"),
        ("accuracy final", f"{metrics['final_accuracy']:.4f}"),
        ("bytes up per site/round", f"{metrics['mean_bytes_up_per_client_round']:.0f}"),
        ("wall time", f"{metrics['wall_s']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)
