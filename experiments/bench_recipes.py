"""Better than SparseGPT? Pruning recipes (pruner x allocation) against ``pruner=sparsegpt
allocation=uniform`` on SmolLM2-135M, centralized, per pattern: the perplexity increase over dense and
its ratio to SparseGPT's, and prune CPU seconds with their ratio to SparseGPT's (one torch thread per run).

Each run is the CLI in its own process (``--jobs`` at a time; a finished run's metrics.json is reused, so
adding recipes reruns nothing). Writes ``experiments/results/recipes.md`` and ``.json``.

    python experiments/bench_recipes.py --windows 128 --jobs 2 --recipes sparsegpt,admm,admm+owl --extra 70%/admm40
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PATTERNS = {"50%": ["sparsity=0.5"], "70%": ["sparsity=0.7"], "2:4": ["pattern=2:4", "sparsity=null"]}
RECIPES = {  # name -> overrides; uniform SparseGPT is the reference of every pattern
    "sparsegpt": ["pruner=sparsegpt"],
    "wanda": ["pruner=wanda"],
    "wanda+owl": ["pruner=wanda", "allocation=owl"],
    "sparsegpt+owl": ["pruner=sparsegpt", "allocation=owl"],
    "admm": ["pruner=admm"],
    "admm+owl": ["pruner=admm", "allocation=owl"],
    "admm40": ["pruner=admm", "pruner.params.iterations=40", "pruner.params.gradual=30"],
}


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def write_results(out: Path, lines: list[str], command: str, rows: list[dict]) -> None:
    """``out``.md (the table) and ``out``.json (the command and rows); the table printed too."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


def run(overrides: list[str], out: Path) -> dict | None:
    """The CLI with ``overrides`` into ``out`` (skipped if it already finished); its metrics or None."""
    metrics = out / "metrics.json"
    if not metrics.exists():
        out.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "cli.main", *overrides, f"hydra.run.dir={out}"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        with open(out / "log.txt", "w") as log:
            done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        if done.returncode != 0:
            print(f"FAILED ({done.returncode}): {shlex.join(command)}; see {out / 'log.txt'}", flush=True)
            return None
    return json.loads(metrics.read_text())


def row(pattern: str, recipe: str, metrics: dict, reference: dict | None) -> dict:
    increase = metrics["ppl_pruned"] - metrics["ppl_dense"]
    ref_increase = reference["ppl_pruned"] - reference["ppl_dense"] if reference else None
    return {
        "pattern": pattern,
        "recipe": recipe,
        "ppl_dense": metrics["ppl_dense"],
        "ppl_pruned": metrics["ppl_pruned"],
        "increase": increase,
        "increase_vs_sparsegpt": increase / ref_increase if ref_increase else None,
        "prune_cpu_s": metrics.get("prune_cpu_s"),
        "cpu_vs_sparsegpt": metrics["prune_cpu_s"] / reference["prune_cpu_s"] if reference else None,
        "sparsity_actual": metrics["sparsity_actual"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--patterns", default=",".join(PATTERNS))
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument(
        "--extra", default="", help="more pattern/recipe runs beyond the grid, e.g. '70%%/admm40'"
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each with one torch thread)")
    parser.add_argument("--runs", type=Path, default=ROOT / "multirun/recipes")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments/results/recipes")
    args = parser.parse_args()
    common = [
        "protocol=centralized",
        f"data.calib_windows={args.windows}",
        "threads=1",
        "progress=false",
        "save_model=false",
    ]
    patterns = args.patterns.split(",")
    recipes = args.recipes.split(",")
    tasks = [
        (p, r)
        for p in patterns
        for r in recipes
        if not ("owl" in r and PATTERNS[p][0].startswith("pattern="))
    ]
    tasks += [tuple(extra.split("/")) for extra in args.extra.split(",") if extra]

    def one(task: tuple[str, str]) -> tuple[tuple[str, str], dict | None]:
        pattern, recipe = task
        out = args.runs / f"w{args.windows}" / f"{pattern.replace(':', 'of').replace('%', '')}_{recipe}"
        return task, run([*common, *PATTERNS[pattern], *RECIPES[recipe]], out)

    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(pool.map(one, tasks))
    rows = []
    for pattern, recipe in tasks:
        metrics = results[(pattern, recipe)]
        if metrics is not None:
            rows.append(row(pattern, recipe, metrics, results.get((pattern, "sparsegpt"))))
    command = "python experiments/bench_recipes.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    def fmt(value, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    lines = [
        "# Pruning recipes against SparseGPT on SmolLM2-135M (centralized)",
        "",
        f"Made by `{command}` at commit `{git_commit()}`: {args.windows} x 512 calibration windows, the bundled "
        "held-out Shakespeare windows, one torch thread per run, "
        f"{args.jobs} runs at a time on a 2-core machine (CPU seconds, not wall time, are compared).",
        "Increase: pruned minus dense perplexity; `/ sparsegpt`: that increase over uniform SparseGPT's for "
        "the same pattern (lower is better); CPU: prune CPU seconds and their ratio to SparseGPT's.",
        "",
        "| pattern | recipe | ppl dense | ppl pruned | increase | / sparsegpt | prune CPU s | CPU / sparsegpt |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['pattern']} | {r['recipe']} | {r['ppl_dense']:.3f} | {r['ppl_pruned']:.3f} | {r['increase']:.3f} "
            f"| {fmt(r['increase_vs_sparsegpt'], '.3f')} | {fmt(r['prune_cpu_s'], '.0f')} "
            f"| {fmt(r['cpu_vs_sparsegpt'], '.2f')} |"
        )
    write_results(args.out, lines, command, rows)


if __name__ == "__main__":
    main()
