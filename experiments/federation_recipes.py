"""Recipes in a real federation: for each recipe (pruner x allocation), ``centralized`` on the pooled
windows, then the federated protocols (Flower Simulation Engine, one CPU per site), with and without
secure aggregation: perplexity and its relative difference to centralized, upload per site, wall time,
and the machine's peak memory in use during the run (all processes: server, Ray and the sites).

Each run is the CLI in its own process, one at a time; a finished run's metrics.json is reused.
Writes ``OUT.md`` and ``OUT.json``.

    python experiments/federation_recipes.py --sites 8 --windows 32 --protocols stats_sync --privacy none,secagg
    python experiments/federation_recipes.py --sites 64 --windows 128 --protocols stats_sync,mask_vote \\
        --out experiments/results/federation_64
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_recipes import PATTERNS, RECIPES, git_commit, write_results  # noqa: E402


def used_memory_mb() -> float:
    """Memory in use on this machine (MemTotal − MemAvailable), MiB."""
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    kb = int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])
    return kb / 1024


def run(overrides: list[str], out: Path) -> dict | None:
    """The CLI into ``out`` (reused if finished), sampling the machine's memory in use meanwhile."""
    metrics = out / "metrics.json"
    if metrics.exists():
        return json.loads(metrics.read_text())
    out.mkdir(parents=True, exist_ok=True)
    baseline, peak, done = used_memory_mb(), [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            peak[0] = max(peak[0], used_memory_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    command = [sys.executable, "-m", "cli.main", *overrides, f"hydra.run.dir={out}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    with open(out / "log.txt", "w") as log:
        finished = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    done.set()
    sampler.join()
    if finished.returncode != 0:
        print(f"FAILED ({finished.returncode}): {shlex.join(command)}; see {out / 'log.txt'}", flush=True)
        return None
    result = json.loads(metrics.read_text())
    result["machine_peak_used_mb"] = peak[0]
    result["machine_used_before_mb"] = baseline
    metrics.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=8)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--pattern", default="50%", choices=sorted(PATTERNS))
    parser.add_argument("--recipes", default="wanda+owl,sparsegpt+owl,admm")
    parser.add_argument("--protocols", default="stats_sync")
    parser.add_argument("--privacy", default="none,secagg")
    parser.add_argument("--partitioner", default="iid")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--runs", type=Path, default=ROOT / "multirun/federation_recipes")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments/results/federation_recipes")
    args = parser.parse_args()
    common = [
        f"data.calib_windows={args.windows}",
        f"data.eval_windows={args.eval_windows}",
        f"federation.num_clients={args.sites}",
        f"federation.min_clients={args.sites}",
        f"federation.partitioner={args.partitioner}",
        *PATTERNS[args.pattern],
        "progress=false",
        "save_model=false",
    ]
    tag = f"s{args.sites}_w{args.windows}_{args.pattern.replace(':', 'of').replace('%', '')}"
    rows = []
    for recipe in args.recipes.split(","):
        base = [*common, *RECIPES[recipe]]
        central = run([*base, "protocol=centralized"], args.runs / tag / f"{recipe}_centralized")
        for protocol in args.protocols.split(","):
            for privacy in args.privacy.split(","):
                out = args.runs / tag / f"{recipe}_{protocol}_{privacy}"
                start = time.perf_counter()
                got = run([*base, f"protocol={protocol}", f"privacy={privacy}"], out)
                if got is None or central is None:
                    continue
                row = {
                    "recipe": recipe,
                    "protocol": protocol,
                    "privacy": privacy,
                    "sites_in_sums": got["num_clients"],
                    "ppl_central": central["ppl_pruned"],
                    "ppl": got["ppl_pruned"],
                    "ppl_rel_diff": got["ppl_pruned"] / central["ppl_pruned"] - 1.0,
                    "up_mb_per_site": got["bytes_up_per_client"] / 2**20,
                    "rounds": got["rounds"],
                    "wall_s": got["wall_s"],
                    "prune_s_ratio": got["prune_s"] / central["prune_s"],
                    "peak_used_mb": got.get("machine_peak_used_mb"),
                    "used_before_mb": got.get("machine_used_before_mb"),
                    "run_s": time.perf_counter() - start,
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    command = "python experiments/federation_recipes.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        f"# Recipes in a federation: {args.sites} sites, {args.windows} x 512 windows, {args.pattern}",
        "",
        f"Made by `{command}` at commit `{git_commit()}`: every row is one real `fedprune` run on the Flower "
        f"Simulation Engine (1 CPU per site, partitioner {args.partitioner}, {args.eval_windows} held-out "
        "windows) against `centralized` on the same pooled windows. Peak memory: the machine's memory in use "
        "(MemTotal − MemAvailable, sampled every second: server, Ray and every site process together).",
        "",
        "| recipe | protocol | privacy | sites in sums | ppl centralized | ppl | rel. diff | up MB/site | rounds "
        "| wall s | prune s / centralized | peak memory used MiB (before the run) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        peak = "—" if r["peak_used_mb"] is None else f"{r['peak_used_mb']:.0f} ({r['used_before_mb']:.0f})"
        lines.append(
            f"| {r['recipe']} | {r['protocol']} | {r['privacy']} | {r['sites_in_sums']} | {r['ppl_central']:.3f} "
            f"| {r['ppl']:.3f} | {r['ppl_rel_diff']:+.4%} | {r['up_mb_per_site']:.2f} | {r['rounds']} "
            f"| {r['wall_s']:.0f} | {r['prune_s_ratio']:.2f} | {peak} |"
        )
    write_results(args.out, lines, command, rows)


if __name__ == "__main__":
    main()
