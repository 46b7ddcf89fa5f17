"""Timing of the Gram sums: row strips of ``GRAM_TILE`` rows (``fedprune.stat_kinds.gram_sum``) against strips
of 256 rows (the default before 2026-12-04) and the 256 x 256 tiles of session 6, all bit-identical, interleaved
so that load on the machine hits them alike; process CPU seconds.

Usage: python experiments/probes/gram_sum_timing.py [THREADS]
"""

import statistics
import sys
import time

import torch

from fedprune.stat_kinds import GRAM_TILE, gram_sum


def tiled(x: torch.Tensor, tile: int = 256) -> torch.Tensor:
    """The former implementation: one batched product per upper tile."""
    n = x.shape[-1]
    out = torch.empty(n, n, dtype=torch.float64)
    for i in range(0, n, tile):
        xi = x[:, :, i : i + tile].transpose(1, 2)
        for j in range(i, n, tile):
            block = torch.bmm(xi, x[:, :, j : j + tile]).double().sum(dim=0)
            out[i : i + tile, j : j + tile] = block
            if j > i:
                out[j : j + tile, i : i + tile] = block.t()
    return out


torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
torch.manual_seed(0)
for width in (576, 1536):
    x = torch.randn(4, 512, width)  # one micro-batch of 4 windows of 512 tokens
    ways = {"tiles 256": tiled, "strips 256": lambda x: gram_sum(x, 256), f"strips {GRAM_TILE}": gram_sum}
    assert all(torch.equal(f(x), tiled(x)) for f in ways.values())
    times = {name: [] for name in ways}
    for _ in range(15):
        for name, f in ways.items():
            start = time.process_time()
            f(x)
            times[name].append(time.process_time() - start)
    print(
        width,
        "  ".join(f"{k}: min {min(v):.4f} s, median {statistics.median(v):.4f} s" for k, v in times.items()),
    )
