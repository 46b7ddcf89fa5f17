"""Probe: SparseGPT's factor and N:M group-mask steps, old vs new, one thread, in one process.

- L⁻¹ of the Cholesky factor: ``solve_triangular(L, I)`` vs :func:`lower_triangular_inverse` (by halves),
  at SmolLM2's input widths 576 and 1536, with the largest difference and the share of float32-equal entries;
- one 2:4 group's mask: stable ``argsort`` + scatter vs :func:`fedprune.masks.prune_lowest` (4 x 576).

python experiments/probes/sparsegpt_factor.py
"""

import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from fedprune.masks import prune_lowest  # noqa: E402  (after sys.path)
from fedprune.pruners.sparsegpt import damped_hessian, lower_triangular_inverse  # noqa: E402


def per_call(fn, repeats: int) -> float:
    start = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - start) / repeats


def sorted_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    lowest = torch.argsort(scores, dim=0, stable=True)[:count]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(0, lowest, True)


torch.manual_seed(0)
for n in (576, 1536):
    x = torch.randn(8192, n, dtype=torch.float64)
    lower = torch.linalg.cholesky(damped_hessian(2 * x.T @ x / 8192, 0.01).flip(0, 1))
    eye = torch.eye(n, dtype=torch.float64)
    solved = torch.linalg.solve_triangular(lower, eye, upper=False)
    halves = lower_triangular_inverse(lower)
    old = per_call(lambda: torch.linalg.solve_triangular(lower, eye, upper=False), 5)  # noqa: B023
    new = per_call(lambda: lower_triangular_inverse(lower), 5)  # noqa: B023
    equal = (solved.float() == halves.float()).double().mean().item()
    print(
        f"L^-1 n={n}: solve {old:.4f} s, halves {new:.4f} s ({old / new:.2f}x); "
        f"max diff {(solved - halves).abs().max().item():.1e}, float32-equal {equal:.7f}"
    )
scores = torch.randn(4, 576)
old = per_call(lambda: sorted_mask(scores, 2), 3000)
new = per_call(lambda: ~prune_lowest(scores, 2, dim=0), 3000)
print(f"2:4 group mask 4x576: sort {old * 1e6:.0f} us, top-k threshold {new * 1e6:.0f} us")
