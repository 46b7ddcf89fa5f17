"""Benchmark: what privacy costs. SmolLM2-135M, 8 sites, 50% unstructured, Wanda and SparseGPT via
``stats_sync`` and ``mask_vote``, ``privacy=none`` vs ``secagg``: perplexity, wall time (and its ratio
to ``none``), bytes uploaded per site; then perplexity vs epsilon for ``secagg_dp`` (``stats_sync``),
plotted with matplotlib. Every run is the ``fedprune`` job itself (a Flower simulation), in this process.

Usage (full size takes hours on a laptop CPU; scale down with the options):
  python experiments/bench_privacy.py [--clients 8] [--windows 64] [--seq-len 256] [--eval-windows 32]
      [--pruners wanda sparsegpt] [--protocols stats_sync mask_vote] [--epsilons 1 4 16 64]
      [--token-bound 1.0] [--out experiments/results/bench_privacy]
  python experiments/bench_privacy.py --quick      # 4 sites, 8 windows of 64 tokens, 4 eval windows
  python experiments/bench_privacy.py --model /tiny/llama --corpus /tiny/corpus --heldout hamlet macbeth --quick
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

logger = logging.getLogger("bench_privacy")


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--windows", type=int, default=64, help="calibration windows over all sites")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--pruners", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--protocols", nargs="+", default=["stats_sync", "mask_vote"])
    parser.add_argument("--epsilons", nargs="*", type=float, default=[1.0, 4.0, 16.0, 64.0])
    parser.add_argument("--dp-pruner", default="wanda")
    parser.add_argument("--token-bound", type=float, default=1.0, help="DP clip A of a token's layer input")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--model", default=None, help="model folder (default: the bundled SmolLM2-135M)")
    parser.add_argument("--corpus", default=None, help="corpus folder (default: the bundled Shakespeare)")
    parser.add_argument("--heldout", nargs="*", default=None)
    parser.add_argument("--report-only", action="store_true", help="tabulate the finished runs, start none")
    parser.add_argument("--quick", action="store_true", help="4 sites, 8 windows x 64 tokens, 4 eval windows")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "bench_privacy")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.windows, args.seq_len, args.eval_windows = 4, 8, 64, 4
        args.epsilons = args.epsilons[:2]
    return args


def _overrides(args: argparse.Namespace, *extra: str) -> list[str]:
    out = [
        f"federation.num_clients={args.clients}",
        f"federation.min_clients={max(2, args.clients // 2 + 1)}",
        f"data.calib_windows={args.windows}",
        f"data.seq_len={args.seq_len}",
        f"data.eval_windows={args.eval_windows}",
        "sparsity=0.5",
        "save_model=false",
        "progress=false",
    ]
    if args.model:
        out += [f"model.path={args.model}", "model.name=custom"]
    if args.corpus:
        out.append(f"data.path={args.corpus}")
    if args.heldout:
        out.append(f"data.heldout=[{','.join(args.heldout)}]")
    return out + list(extra)


def _run(overrides: list[str], out_dir: Path, report_only: bool = False) -> dict | None:
    """One ``fedprune`` job; a finished run (its ``metrics.json`` exists) is read back, not rerun
    (``report_only``: an unfinished run is skipped)."""
    from cli.main import run

    done = out_dir / "metrics.json"
    if done.exists():
        return json.loads(done.read_text())
    if report_only:
        return None
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    logger.info("running %s", " ".join(overrides))
    return run(cfg, out_dir)


def _row(metrics: dict, reference: dict | None) -> dict:
    keys = ("protocol", "pruner", "privacy", "ppl_dense", "ppl_pruned", "wall_s", "bytes_up_per_client")
    row = {k: metrics.get(k) for k in keys}
    row["rounds"] = metrics.get("rounds")
    row["prune_s"] = metrics.get("prune_s")
    none = metrics.get("privacy") == "none"
    row["prune_ratio"] = metrics["prune_s"] / reference["prune_s"] if reference else (1.0 if none else None)
    row["ppl_vs_none"] = (
        metrics["ppl_pruned"] / reference["ppl_pruned"] - 1.0 if reference else (0.0 if none else None)
    )
    for key in ("dp_epsilon", "dp_delta", "dp_sigma"):
        if key in metrics:
            row[key] = metrics[key]
    return row


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else spec.format(value)


def _table(rows: list[dict], command: str) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        "| protocol | pruner | privacy | ε | ppl pruned | vs none | federated s | × none | wall s | MB up / site | rounds |",
        "|" + " --- |" * 11,
    ]
    for r in rows:
        eps = f"{r['dp_epsilon']:.3g}" if "dp_epsilon" in r else "—"
        lines.append(
            f"| {r['protocol']} | {r['pruner']} | {r['privacy']} | {eps} | {r['ppl_pruned']:.3f} | "
            f"{_fmt(r['ppl_vs_none'], '{:+.3%}')} | {r['prune_s']:.1f} | {_fmt(r['prune_ratio'], '{:.2f}')} | "
            f"{r['wall_s']:.1f} | "
            f"{r['bytes_up_per_client'] / 1e6:.3f} | {r['rounds']} |"
        )
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp = sorted((r for r in rows if r["privacy"] == "secagg_dp"), key=lambda r: r["dp_epsilon"])
    if not dp:
        return
    plain = [r for r in rows if r["privacy"] == "secagg" and r["protocol"] == "stats_sync"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["dp_epsilon"] for r in dp], [r["ppl_pruned"] for r in dp], "o-", label="secagg_dp")
    if plain:
        ax.axhline(plain[0]["ppl_pruned"], color="gray", ls="--", label="secagg (no noise)")
    ax.set_xscale("log")
    ax.set_yscale("log")  # perplexities span from near-dense to millions
    ax.set_xlabel(f"epsilon (delta = {dp[0]['dp_delta']:g}, whole run)")
    ax.set_ylabel("pruned perplexity (log)")
    ax.set_title(f"stats_sync {dp[0]['pruner']}, 50% unstructured")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # every run's own outputs, per scale (resumable: finished runs are read back)
    scale = f"{args.clients}sites_{args.windows}x{args.seq_len}_eval{args.eval_windows}_A{args.token_bound:g}"
    runs = ROOT / "multirun" / "bench_privacy" / scale
    rows = []
    for protocol in args.protocols:
        for pruner in args.pruners:
            reference = None
            for privacy in ("none", "secagg"):
                extra = [f"protocol={protocol}", f"pruner={pruner}", f"privacy={privacy}"]
                metrics = _run(
                    _overrides(args, *extra), runs / f"{protocol}_{pruner}_{privacy}", args.report_only
                )
                if metrics is None:
                    break
                rows.append(_row(metrics, reference))
                reference = reference or metrics
    for epsilon in args.epsilons:
        extra = [
            "protocol=stats_sync",
            f"pruner={args.dp_pruner}",
            "privacy=secagg_dp",
            f"privacy.epsilon={epsilon}",
            f"privacy.delta={args.delta}",
            f"privacy.token_bound={args.token_bound}",
        ]
        metrics = _run(_overrides(args, *extra), runs / f"dp_eps{epsilon:g}", args.report_only)
        if metrics is not None:
            rows.append(_row(metrics, None))
    command = "python experiments/bench_privacy.py " + " ".join(
        a for a in sys.argv[1:] if a != "--report-only"
    )
    (args.out.with_suffix(".json")).write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    (args.out.with_suffix(".md")).write_text(_table(rows, command))
    _plot(rows, args.out.with_suffix(".png"))
    print(_table(rows, command))


if __name__ == "__main__":
    main()
