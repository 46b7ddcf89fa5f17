# ruff: noqa: B023  (each lambda is called at once, inside its loop iteration)
"""Per-block time profile of the sequential pruning pipeline on SmolLM2 (32x512 calibration, first 3 blocks).

Usage: python experiments/probes/profile_block.py   (figures quoted in experiments/results/bench_prune.md)
"""

import time

import torch
from calibration import smollm2_with_windows  # experiments/probes/calibration.py

from fedprune.masks import parse_pattern
from fedprune.models import find_blocks
from fedprune.pruners import get_pruner
from fedprune.sequential import capture_block_inputs, collect_block_stats, prune_layers, run_block

model, ids = smollm2_with_windows(32, 512)
T = {}


def tm(k, f):
    t = time.perf_counter()
    r = f()
    T[k] = T.get(k, 0) + time.perf_counter() - t
    return r


with torch.no_grad():
    tm("forward_full", lambda: [model(input_ids=b, use_cache=False) for b in ids.split(4)])
inp = tm("capture", lambda: capture_block_inputs(model, ids, 4))
_, blocks = find_blocks(model)
sg = get_pruner("sparsegpt")
wa = get_pruner("wanda")
p = parse_pattern("unstructured")
for b in range(3):
    st = tm("stats_hessian", lambda: collect_block_stats(blocks[b], inp, "hessian"))
    tm("stats_sqnorm", lambda: collect_block_stats(blocks[b], inp, "sq_norm"))
    tm("prune_sgpt", lambda: prune_layers(blocks[b], st, sg, 0.5, p))
    inp = tm("run_block", lambda: run_block(blocks[b], inp))
for k, v in T.items():
    print(
        k,
        round(v, 2),
        "per block" if k not in ("forward_full", "capture") else "",
        round(v / 3, 2) if k not in ("forward_full", "capture") else "",
    )
