"""Benchmark: the bfloat16 calibration path next to float32, same calibration and held-out windows.

Each row is one real ``fedprune protocol=centralized`` run (its own process, ``threads`` fixed), for
``model.dtype`` float32 and bfloat16: block forwards in that dtype, statistics as float64 sums of float32
products, the SparseGPT sweep in float32 (``fedprune.config.ModelSpec``). Reports prune wall and CPU time
(``prune_s``, ``prune_cpu_s`` from metrics.json), their bfloat16 / float32 ratios, and the perplexity of
each pruned model on the held-out works (evaluated in its own dtype) with the relative difference.

Usage: python experiments/bench_dtype.py [--windows 128] [--threads 1] [--pruners wanda,sparsegpt]
       [--patterns unstructured,2:4] [--seed 0] [--out experiments/results/bench_dtype]

``--seed`` is the job's ``seed`` (the calibration window sampler): the same comparison on other calibration
windows, to tell a systematic perplexity cost from rounding-level scatter (``experiments/seed_summary.py``
averages the rows of several seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16")
# kernel switches, recorded with the rows
KERNEL_ENVS = ("FEDPRUNE_ATTENTION", "FEDPRUNE_LINEAR", "FEDPRUNE_GRAM")


def run_job(run_dir: Path, pruner: str, pattern: str, dtype: str, args: argparse.Namespace) -> dict:
    """One centralized run (skipped when its metrics.json is already there); its metrics."""
    metrics = run_dir / "metrics.json"
    if not metrics.exists():
        command = [
            str(ROOT / ".venv/bin/fedprune"),
            "protocol=centralized",
            f"pruner={pruner}",
            f"pattern={pattern}",
            *(["sparsity=0.5"] if pattern == "unstructured" else ["sparsity=null"]),
            f"model.dtype={dtype}",
            f"threads={args.threads}",
            f"data.calib_windows={args.windows}",
            f"data.seq_len={args.seq_len}",
            f"data.eval_windows={args.eval_windows}",
            f"seed={args.seed}",
            "save_model=false",
            "progress=false",
            f"hydra.run.dir={run_dir}",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        subprocess.run(command, check=True, cwd=ROOT, env=env)
    return json.loads(metrics.read_text())


def rows_of(results: dict[tuple[str, str, str], dict], args: argparse.Namespace) -> list[dict]:
    """Per pruner and pattern: both dtypes' times and perplexities, and the ratios."""
    rows = []
    for pruner in args.pruners.split(","):
        for pattern in args.patterns.split(","):
            f32, b16 = (results[(pruner, pattern, dtype)] for dtype in DTYPES)
            rows.append(
                {
                    "pruner": pruner,
                    "pattern": pattern,
                    "seed": args.seed,
                    "cpu_s_float32": f32["prune_cpu_s"],
                    "cpu_s_bfloat16": b16["prune_cpu_s"],
                    "cpu_ratio": b16["prune_cpu_s"] / f32["prune_cpu_s"],
                    "wall_s_float32": f32["prune_s"],
                    "wall_s_bfloat16": b16["prune_s"],
                    "wall_ratio": b16["prune_s"] / f32["prune_s"],
                    "ppl_dense_float32": f32["ppl_dense"],
                    "ppl_dense_bfloat16": b16["ppl_dense"],
                    "ppl_float32": f32["ppl_pruned"],
                    "ppl_bfloat16": b16["ppl_pruned"],
                    "ppl_rel_diff": b16["ppl_pruned"] / f32["ppl_pruned"] - 1.0,
                    "peak_rss_mb_float32": f32["peak_rss_mb"],
                    "peak_rss_mb_bfloat16": b16["peak_rss_mb"],
                }
            )
    return rows


def command_line() -> str:
    """This benchmark's command, with the kernel switches set in the environment."""
    kernels = [f"{env}={os.environ[env]}" for env in KERNEL_ENVS if env in os.environ]
    return " ".join([*kernels, "python experiments/bench_dtype.py", *sys.argv[1:]])


def gram_kernel() -> str:
    """Which product the bfloat16 runs' Gram sums take on this machine (same checks as the runs)."""
    sys.path.insert(0, str(ROOT))
    from fedprune.cpu_gram import native_gram_available

    return "native AVX512-BF16 kernel" if native_gram_available() else "float32 upcast (torch)"


def table(rows: list[dict], args: argparse.Namespace, commit: str) -> str:
    command = command_line()
    lines = [
        "# bfloat16 calibration path vs float32, SmolLM2-135M, centralized",
        "",
        f"Made by `{command}` at commit {commit}: {args.windows} × {args.seq_len} calibration tokens, "
        f"{args.eval_windows} held-out windows, calibration seed {args.seed}, {args.threads} thread(s), one process "
        "per run. Targets "
        f"(issue 15): bfloat16 prune time <= 0.7x float32, perplexity within 1%. bfloat16 Gram sums: {gram_kernel()}.",
        "",
        "| pruner | pattern | prune CPU s fp32 | prune CPU s bf16 | CPU ratio | prune wall s fp32 "
        "| prune wall s bf16 | wall ratio | ppl dense fp32 / bf16 | ppl pruned fp32 | ppl pruned bf16 "
        "| ppl rel. diff | peak RSS MB fp32 / bf16 |",
        "|" + " --- |" * 13,
    ]
    for r in rows:
        lines.append(
            f"| {r['pruner']} | {r['pattern']} | {r['cpu_s_float32']:.0f} | {r['cpu_s_bfloat16']:.0f} "
            f"| {r['cpu_ratio']:.2f} | {r['wall_s_float32']:.0f} | {r['wall_s_bfloat16']:.0f} "
            f"| {r['wall_ratio']:.2f} | {r['ppl_dense_float32']:.3f} / {r['ppl_dense_bfloat16']:.3f} "
            f"| {r['ppl_float32']:.3f} | {r['ppl_bfloat16']:.3f} | {r['ppl_rel_diff']:+.2%} "
            f"| {r['peak_rss_mb_float32']:.0f} / {r['peak_rss_mb_bfloat16']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="the job's seed: which calibration windows")
    parser.add_argument("--pruners", default="wanda,sparsegpt")
    parser.add_argument("--patterns", default="unstructured,2:4")
    parser.add_argument("--runs", type=Path, default=Path("multirun/bench_dtype"))
    parser.add_argument("--out", type=Path, default=Path("experiments/results/bench_dtype"))
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout.strip()
    results = {}
    for pruner in args.pruners.split(","):
        for pattern in args.patterns.split(","):
            for dtype in DTYPES:
                name = f"{pruner}_{pattern.replace(':', 'of')}_{dtype}_w{args.windows}_t{args.threads}" + (
                    f"_s{args.seed}" if args.seed else ""
                )
                results[(pruner, pattern, dtype)] = run_job(args.runs / name, pruner, pattern, dtype, args)
    rows = rows_of(results, args)
    text = table(rows, args, commit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {
                "command": command_line(),
                "commit": commit,
                "seed": args.seed,
                "windows": args.windows,
                "seq_len": args.seq_len,
                "eval_windows": args.eval_windows,
                "threads": args.threads,
                "kernels": {env: os.environ.get(env, "(default)") for env in KERNEL_ENVS},
                "bf16_gram": gram_kernel(),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(text)


if __name__ == "__main__":
    main()
