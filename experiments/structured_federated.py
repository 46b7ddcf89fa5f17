"""Structured pruning: ``stats_sync`` with several sites against ``centralized`` on the pooled windows, on
SmolLM2 (real site tasks; in process by default, or a Flower simulation with ``--engine flower``).

For each method, site count and privacy setting: the perplexity difference to centralized, whether every
saved tensor has the same shape (the same numbers of units kept) and the largest absolute difference of
any saved tensor (kept units differ -> different rows, a large difference). Writes
``experiments/results/structured_federated.md`` and ``.json``.

    python experiments/structured_federated.py --methods variance,obs --sites 4,8 --windows 16
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def run_job(overrides: list[str], out: Path, engine: str, sites: int) -> dict:
    from cli.main import job_of, run
    from fedprune.protocols.catalog import validate
    from fedprune.protocols.tasks import in_process_launcher

    if (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())
    cfg = compose(overrides)
    if engine == "flower":
        return run(cfg, out)
    job = job_of(cfg)
    return validate(job).run(job, out, in_process_launcher(sites, sites))


def compare(central: Path, federated: Path) -> dict:
    from fedprune import load_pruned

    want = load_pruned(central / "model").state_dict()
    got = load_pruned(federated / "model").state_dict()
    same_shapes = {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in want.items()}
    diff = max((got[k] - want[k]).abs().max().item() for k in want) if same_shapes else float("inf")
    return {"same_shapes": same_shapes, "max_abs_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="variance,obs")
    parser.add_argument("--sites", default="4,8")
    parser.add_argument("--privacy", default="none,secagg")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--shape", default="structured.ffn=0.5,structured.heads=0.33")
    parser.add_argument("--engine", choices=("inprocess", "flower"), default="inprocess")
    parser.add_argument("--runs", type=Path, default=Path("multirun/structured_federated"))
    parser.add_argument("--out", type=Path, default=ROOT / "experiments/results/structured_federated")
    args = parser.parse_args()
    common = [
        "pattern=structured",
        *args.shape.split(","),
        f"data.calib_windows={args.windows}",
        f"data.seq_len={args.seq_len}",
        f"data.eval_windows={args.eval_windows}",
        "progress=false",
    ]
    rows = []
    for method in args.methods.split(","):
        for sites in [int(s) for s in args.sites.split(",")]:
            base = [
                *common,
                f"pruner={method}",
                f"federation.num_clients={sites}",
                f"federation.min_clients={sites}",
            ]
            central_dir = args.runs / f"{method}_central_{sites}"
            central = run_job([*base, "protocol=centralized"], central_dir, args.engine, sites)
            for privacy in args.privacy.split(","):
                extra = ["protocol=stats_sync", f"privacy={privacy}"]
                fed_dir = args.runs / f"{method}_stats_sync_{sites}_{privacy}"
                start = time.perf_counter()
                federated = run_job([*base, *extra], fed_dir, args.engine, sites)
                row = {
                    "method": method,
                    "sites": sites,
                    "privacy": privacy,
                    "ppl_central": central["ppl_pruned"],
                    "ppl_federated": federated["ppl_pruned"],
                    "ppl_rel_diff": federated["ppl_pruned"] / central["ppl_pruned"] - 1.0,
                    "sites_in_sums": federated["num_clients"],
                    "rejected": len(federated.get("rejected", [])),
                    "wall_s": time.perf_counter() - start,
                    **compare(central_dir, fed_dir),
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    command = "python experiments/structured_federated.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        "# Structured pruning: stats_sync vs centralized on SmolLM2",
        "",
        f"Commit {commit.stdout.strip()}, `{command}` (engine {args.engine}; shape {args.shape}; "
        f"{args.windows} x {args.seq_len} calibration windows pooled, {args.eval_windows} held-out windows).",
        "Same shapes: every saved tensor has the centralized shape; max |diff|: the largest difference of any "
        "saved tensor (a different kept unit would show as a large one).",
        "",
        "| method | sites | privacy | ppl centralized | ppl stats_sync | rel. diff | same shapes | max abs diff | sites in sums |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['sites']} | {r['privacy']} | {r['ppl_central']:.4f} | {r['ppl_federated']:.4f} "
            f"| {r['ppl_rel_diff']:+.2e} | {r['same_shapes']} | {r['max_abs_diff']:.2e} | {r['sites_in_sums']} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
