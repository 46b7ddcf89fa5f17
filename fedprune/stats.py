"""Calibration statistics as sums with counts.

Every statistic is a float64 sum over tokens plus the token count, so two sets of statistics for the
same layer add up exactly: ``add_stats(stats(A), stats(B)) == stats(A ∪ B)``. Per-window partial sums
are computed in the activations' dtype and summed across windows in float64, which makes the result
independent (to float64 rounding) of how windows are grouped into batches or split across clients.

Kinds
-----
``sq_norm``: Σ_t x_tj², shape ``(in_features,)`` (Wanda's squared activation norms).
``hessian``: Σ_t x_t x_tᵀ, shape ``(in_features, in_features)`` (SparseGPT/OBS; H = 2·Σ/count).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stats:
    """A summed statistic of one layer's inputs and the number of tokens it sums over."""

    kind: str
    total: torch.Tensor  # float64
    count: int

    def mean(self) -> torch.Tensor:
        """The per-token average (``total / count``)."""
        if self.count <= 0:
            raise ValueError("statistics over zero tokens have no mean")
        return self.total / self.count


def _as_windows(x: torch.Tensor) -> torch.Tensor:
    """View layer inputs as ``(windows, tokens, in_features)``."""
    if x.dim() == 2:
        return x.unsqueeze(0)
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def sq_norm_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ over tokens of x², per input feature. ``x``: ``(..., tokens, in)`` -> ``(in,)`` float64."""
    xw = _as_windows(x.detach())  # (windows, tokens, in)
    return xw.pow(2).sum(dim=1).double().sum(dim=0)


GRAM_TILE = 256  # features per tile: only tiles on and above the diagonal are multiplied


def gram_sum(x: torch.Tensor, tile: int = GRAM_TILE) -> torch.Tensor:
    """Σ over tokens of x xᵀ. ``x``: ``(..., tokens, in)`` -> ``(in, in)`` float64.

    The Gram matrix is symmetric, so it is computed tile by tile, upper tiles only (about half the
    multiply-adds for wide inputs), each per window and summed over windows in float64.
    """
    xw = _as_windows(x.detach())  # (windows, tokens, in)
    n = xw.shape[-1]
    out = torch.empty(n, n, dtype=torch.float64)
    starts = range(0, n, tile)
    for i in starts:
        xi = xw[:, :, i : i + tile].transpose(1, 2)  # (windows, tile_i, tokens)
        for j in starts:
            if j < i:
                continue
            block = torch.bmm(xi, xw[:, :, j : j + tile]).double().sum(dim=0)  # (tile_i, tile_j)
            out[i : i + tile, j : j + tile] = block
            if j > i:
                out[j : j + tile, i : i + tile] = block.t()
    return out


STAT_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sq_norm": sq_norm_sum,
    "hessian": gram_sum,
}


def token_count(x: torch.Tensor) -> int:
    """Number of tokens in a batch of layer inputs ``(..., in)``."""
    return x.numel() // x.shape[-1]


def batch_stats(kind: str, x: torch.Tensor) -> Stats:
    """Statistics of one batch of layer inputs."""
    if kind not in STAT_FUNCTIONS:
        raise KeyError(f"unknown statistic {kind!r}; known: {sorted(STAT_FUNCTIONS)}")
    return Stats(kind=kind, total=STAT_FUNCTIONS[kind](x), count=token_count(x))


def empty_stats(kind: str, in_features: int) -> Stats:
    """Zero statistics of the given kind."""
    shape = (in_features,) if kind == "sq_norm" else (in_features, in_features)
    if kind not in STAT_FUNCTIONS:
        raise KeyError(f"unknown statistic {kind!r}; known: {sorted(STAT_FUNCTIONS)}")
    return Stats(kind=kind, total=torch.zeros(shape, dtype=torch.float64), count=0)


def add_stats(a: Stats, b: Stats) -> Stats:
    """Sum of two statistics of the same kind and layer."""
    if a.kind != b.kind or a.total.shape != b.total.shape:
        raise ValueError(
            f"cannot add {a.kind}{tuple(a.total.shape)} and {b.kind}{tuple(b.total.shape)}"
        )
    return Stats(kind=a.kind, total=a.total + b.total, count=a.count + b.count)


def sum_stats(parts: list[Stats]) -> Stats:
    """Sum of a non-empty list of statistics."""
    if not parts:
        raise ValueError("no statistics to sum")
    total = parts[0]
    for part in parts[1:]:
        total = add_stats(total, part)
    return total
