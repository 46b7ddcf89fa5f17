"""Timing of the Gram sums: row strips (``fedprune.stat_kinds.gram_sum``) against the 256 x 256 tiles they
replaced, both bit-identical, interleaved so that load on the machine hits both alike.

Usage: python experiments/probes/gram_sum_timing.py [THREADS]   (figures quoted in the session 6 note)
"""

import statistics
import sys
import time

import torch

from fedprune.stat_kinds import gram_sum


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
    assert torch.equal(gram_sum(x), tiled(x))
    times = {"tiles": [], "strips": []}
    for _ in range(15):
        for name, f in (("tiles", tiled), ("strips", gram_sum)):
            start = time.perf_counter()
            f(x)
            times[name].append(time.perf_counter() - start)
    print(width, "  ".join(f"{k} min {min(v):.3f} s, median {statistics.median(v):.3f} s" for k, v in times.items()))
