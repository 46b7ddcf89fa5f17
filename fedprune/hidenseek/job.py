"""``protocol=hidenseek``: HideNseek and its baselines on digits over a federation.

The server builds the seeded random network, prunes it without data (``protocol.prune``: SynFlow,
magnitude or random, at ``protocol.density``), then runs ``protocol.rounds`` rounds
(``fedprune/hidenseek/server.py``; the sites' side is ``fedprune/hidenseek/site.py``) of
``protocol.variant``:

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedprune.config import JobConfig, check, check_sites
from fedprune.hidenseek import site as _site  # noqa: F401  (registers the site task)
from fedprune.hidenseek.baseline_masks import magnitude_masks_at_init, random_masks
from fedprune.hidenseek.data import load_digits_split
from fedprune.hidenseek.models import INIT_SCHEMES, build_model, masks_density, prunable_weights
from fedprune.hidenseek.server import HideNseekJob, run_hidenseek_rounds
from fedprune.hidenseek.site import HideNseekTask
from fedprune.hidenseek.synflow import synflow_masks
from fedprune.outputs import peak_rss_mb, write_json_atomic
from fedprune.protocols.federation import Launcher
from fedprune.protocols.registry import ProtocolUnit, parse_options, register_protocol

logger = logging.getLogger(__name__)

VARIANTS = ("sign_supermask", "binary_supermask", "fedavg_dense", "fedavg_pruned")
PRUNE_METHODS = ("synflow", "magnitude", "random")
AGGREGATIONS = ("vote", "score_average", "score_delta")
ARCHS = ("mlp", "cnn")
OPTIMIZERS = ("sgd", "adam")
PLOT_NAME = "accuracy.png"


def _one_of(value: object, key: str, known: tuple[str, ...]) -> None:
    check(str(value) in known, key, f"must be one of {known}, got {value!r}")


@dataclass(frozen=True)
class HideNseekOptions:
    """``protocol.*`` of HideNseek (defaults as in ``conf/protocol/hidenseek.yaml``)."""

    variant: str = "sign_supermask"
    model: str = "mlp"
    hidden: int = 128
    init: str = "kaiming_normal"
    density: float = 0.5
    prune: str = "synflow"
    synflow_iterations: int = 100
    aggregation: str = "score_delta"
    server_lr: float = 1.0
    delta_clip_quantile: float = 0.9
    delta_topk: float = 0.025
    alpha: float = 1.0
    rounds: int = 20
    local_epochs: int = 5
    lr: float = 1.0
    fedavg_lr: float = 0.05
    momentum: float = 0.9
    optimizer: str = "sgd"
    batch_size: int = 32
    init_scale: float = 0.1
    test_fraction: float = 0.2
    min_client_samples: int = 10

    def __post_init__(self) -> None:
        _one_of(self.variant, "protocol.variant", VARIANTS)
        _one_of(self.model, "protocol.model", ARCHS)
        _one_of(self.init, "protocol.init", INIT_SCHEMES)
        _one_of(self.prune, "protocol.prune", PRUNE_METHODS)
        _one_of(self.aggregation, "protocol.aggregation", AGGREGATIONS)
        _one_of(self.optimizer, "protocol.optimizer", OPTIMIZERS)
        p = self
        check(0.0 < p.density <= 1.0, "protocol.density", f"must be in (0, 1], got {p.density}")
        check(p.alpha > 0.0, "protocol.alpha", f"must be > 0, got {p.alpha}")
        check(p.hidden >= 1, "protocol.hidden", f"must be >= 1, got {p.hidden}")
        check(p.rounds >= 1, "protocol.rounds", f"must be >= 1, got {p.rounds}")
        check(p.local_epochs >= 1, "protocol.local_epochs", f"must be >= 1, got {p.local_epochs}")
        check(p.batch_size >= 1, "protocol.batch_size", f"must be >= 1, got {p.batch_size}")
        check(p.lr > 0.0, "protocol.lr", f"must be > 0, got {p.lr}")
        check(p.fedavg_lr > 0.0, "protocol.fedavg_lr", f"must be > 0, got {p.fedavg_lr}")
        check(0.0 <= p.momentum < 1.0, "protocol.momentum", f"must be in [0, 1), got {p.momentum}")
        check(p.init_scale > 0.0, "protocol.init_scale", f"must be > 0, got {p.init_scale}")
        check(p.server_lr > 0.0, "protocol.server_lr", f"must be > 0, got {p.server_lr}")
        check(
            0.0 < p.delta_clip_quantile <= 1.0,
            "protocol.delta_clip_quantile",
            f"must be in (0, 1], got {p.delta_clip_quantile}",
        )
        check(0.0 <= p.delta_topk < 1.0, "protocol.delta_topk", f"must be in [0, 1), got {p.delta_topk}")
        check(p.synflow_iterations >= 1, "protocol.synflow_iterations", "must be >= 1")
        check(0.0 < p.test_fraction < 1.0, "protocol.test_fraction", "must be in (0, 1)")
        check(p.min_client_samples >= 1, "protocol.min_client_samples", "must be >= 1")
        check(
            p.aggregation == "vote" or p.variant in ("sign_supermask", "binary_supermask"),
            "protocol.aggregation",
            "score_average and score_delta apply to the supermask variants only",
        )

    @classmethod
    def from_options(cls, options) -> HideNseekOptions:
        return parse_options(cls, options)


def validate_hidenseek(job: JobConfig) -> None:
    """Checks of ``protocol=hidenseek`` and the ``federation`` group (no model or corpus involved)."""
    HideNseekOptions.from_options(job.protocol)
    check_sites(job.federation)
    check(not job.speed.measure, "speed.measure", "times text generation: not with protocol=hidenseek")


def prune_at_init(model: torch.nn.Module, method: str, density: float, iterations: int, seed: int):
    """The server's data-free keep-masks: ``"<module>.weight" -> bool``."""
    if method == "synflow":
        return synflow_masks(model, density, iterations=iterations)
    if method == "magnitude":
        return magnitude_masks_at_init(model, density)
    return random_masks(model, density, seed)


def site_task_of(p: HideNseekOptions, seed: int) -> HideNseekTask:
    """What every site needs, sent in each message (the round and kept count are set per round)."""
    fedavg = p.variant.startswith("fedavg")
    return HideNseekTask(
        variant=p.variant,
        aggregation=p.aggregation,
        arch=p.model,
        hidden=p.hidden,
        init=p.init,
        model_seed=seed,
        data_seed=seed,
        seed=seed,
        test_fraction=p.test_fraction,
        alpha=p.alpha,
        min_size=p.min_client_samples,
        epochs=p.local_epochs,
        lr=float(p.fedavg_lr if fedavg else p.lr),
        momentum=p.momentum,
        batch_size=p.batch_size,
        init_scale=p.init_scale,
        optimizer=p.optimizer,
        delta_clip_quantile=p.delta_clip_quantile,
        delta_topk=p.delta_topk,
    )


def build_job(job: JobConfig) -> HideNseekJob:
    """The server's model, masks and test split, as a :class:`HideNseekJob`."""
    p, seed = HideNseekOptions.from_options(job.protocol), job.seed
    model = build_model(p.model, seed, p.init, hidden=p.hidden)
    if p.variant == "fedavg_dense":
        masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in prunable_weights(model).items()}
    else:
        masks = prune_at_init(model, p.prune, p.density, p.synflow_iterations, seed)
    split = load_digits_split(p.test_fraction, seed)
    return HideNseekJob(
        variant=p.variant,
        aggregation=p.aggregation,
        base_model=model,
        masks=masks,
        rounds=p.rounds,
        init_scale=p.init_scale,
        server_lr=p.server_lr,
        task=site_task_of(p, seed),
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


def outcome_metrics(config: JobConfig, job: HideNseekJob, outcome, fed, wall_s: float) -> dict:
    """``metrics.json``: config, accuracy per round, bytes per site per round (by partition id)."""
    p = HideNseekOptions.from_options(config.protocol)
    records = outcome.records[1:]
    up = [float(np.mean(list(r.bytes_up.values()))) for r in records]
    down = [float(np.mean(list(r.bytes_down.values()))) for r in records]
    total = sum(mask.numel() for mask in job.masks.values())
    return {
        "protocol": "hidenseek",
        "variant": job.variant,
        "aggregation": job.aggregation,
        "model": p.model,
        "hidden": p.hidden,
        "prune": "none" if job.variant == "fedavg_dense" else p.prune,
        "density": p.density if job.variant != "fedavg_dense" else 1.0,
        "density_actual": masks_density(job.masks),
        "kept_weights": sum(int(mask.sum()) for mask in job.masks.values()),
        "total_weights": total,
        "alpha": p.alpha,
        "num_clients": config.federation.num_clients,
        "rounds": job.rounds,
        "local_epochs": p.local_epochs,
        "lr": job.task.lr,
        "server_lr": job.server_lr,
        "delta_clip_quantile": job.task.delta_clip_quantile,
        "delta_topk": job.task.delta_topk,
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
        "seed": config.seed,
    }


def run_hidenseek(config: JobConfig, out_dir: Path, launch: Launcher) -> dict:
    """Run ``protocol=hidenseek`` over the federation ``launch`` gives."""
    validate_hidenseek(config)
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    job = build_job(config)
    result: dict = {}

    def server_main(fed) -> None:
        result["outcome"] = run_hidenseek_rounds(fed, job)
        result["fed"] = fed

    launch(server_main)
    if "outcome" not in result:
        raise RuntimeError("the federated run ended without a result (see the log above)")
    metrics = outcome_metrics(config, job, result["outcome"], result["fed"], time.perf_counter() - start)
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


UNIT = register_protocol(
    ProtocolUnit(
        "hidenseek", HideNseekOptions, run_hidenseek, validate_hidenseek, summary_table, federated=True
    )
)
