"""Benchmark: prune time and peak memory of each pruner next to one plain forward pass, in one run.

For each pruner a fresh child process loads the model, times one plain forward pass (with lm_head) over
the calibration windows, then prunes sequentially and reports its wall time and peak RSS; the ratios
compare numbers from the same process. Memory target: peak RSS <= 1.5 × model size + one block's
activations (inputs and outputs of one block for all windows), over the RSS of the loaded model.

Usage: python experiments/bench_prune.py [--windows 32] [--seq-len 512] [--out experiments/results/bench_prune]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path

import torch


def _measure(pruner_name: str, windows: int, seq_len: int, batch_size: int, queue) -> None:
    import os

    import psutil

    from fedprune.data.assets import ensure_corpus, ensure_model
    from fedprune.data.corpus import load_works, split_works
    from fedprune.data.windows import sample_windows, tokenize_works
    from fedprune.masks import parse_pattern
    from fedprune.models import load_causal_lm, load_tokenizer
    from fedprune.outputs import peak_rss_mb
    from fedprune.pruners import get_pruner
    from fedprune.sequential import prune_model_

    path = ensure_model("smollm2-135m")
    tokenizer = load_tokenizer(path)
    calib, _ = split_works(load_works(ensure_corpus("shakespeare")))
    ids = sample_windows(tokenize_works(tokenizer, calib), windows, seq_len, seed=0)
    model = load_causal_lm(path)
    rss_loaded = psutil.Process(os.getpid()).memory_info().rss / 2**20
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    with torch.no_grad():
        start = time.perf_counter()
        for batch in ids.split(batch_size):
            model(input_ids=batch, use_cache=False)
        forward_s = time.perf_counter() - start
    start = time.perf_counter()
    prune_model_(model, ids, get_pruner(pruner_name), 0.5, parse_pattern("unstructured"), batch_size, False)
    prune_s = time.perf_counter() - start
    hidden = model.config.hidden_size
    activations_mb = 2 * ids.numel() * hidden * 4 / 2**20  # one block's inputs and outputs, fp32
    queue.put(
        {
            "pruner": pruner_name,
            "windows": windows,
            "seq_len": seq_len,
            "forward_s": forward_s,
            "prune_s": prune_s,
            "prune_over_forward": prune_s / forward_s,
            "model_mb": model_mb,
            "rss_loaded_mb": rss_loaded,
            "peak_rss_mb": peak_rss_mb(),
            "activations_mb": activations_mb,
            "peak_over_loaded_mb": peak_rss_mb() - rss_loaded,
            "memory_budget_mb": 1.5 * model_mb + activations_mb,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pruners", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/bench_prune"))
    args = parser.parse_args()
    context = mp.get_context("spawn")
    rows = []
    for name in args.pruners.split(","):
        queue = context.Queue()
        child = context.Process(target=_measure, args=(name, args.windows, args.seq_len, args.batch_size, queue))
        child.start()
        rows.append(queue.get())
        child.join()
        print(json.dumps(rows[-1]), flush=True)
    command = (
        f"python experiments/bench_prune.py --windows {args.windows} --seq-len {args.seq_len} "
        f"--batch-size {args.batch_size}"
    )
    lines = [
        "# Prune time and memory, SmolLM2-135M, 50% unstructured",
        "",
        f"Made by `{command}` (one child process per pruner; ratios within a process).",
        "",
        "| pruner | forward s | prune s | prune / forward | model MB | RSS loaded MB | peak RSS MB "
        "| peak − loaded MB | budget 1.5·model + activations MB |",
        "|" + " --- |" * 9,
    ]
    for r in rows:
        lines.append(
            f"| {r['pruner']} | {r['forward_s']:.1f} | {r['prune_s']:.1f} | {r['prune_over_forward']:.2f} "
            f"| {r['model_mb']:.0f} | {r['rss_loaded_mb']:.0f} | {r['peak_rss_mb']:.0f} "
            f"| {r['peak_over_loaded_mb']:.0f} | {r['memory_budget_mb']:.0f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
