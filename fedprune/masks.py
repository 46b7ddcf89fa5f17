"""Mask selection (unstructured per group, N:M), bit packing and sparsity reports.

Masks are boolean with ``True`` = keep. Ties are broken deterministically by a stable sort: among equal
scores the weight with the lower flat index is pruned first.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

GROUPS = ("layer", "row", "column")


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern: ``unstructured`` or N:M (keep ``n`` of every ``m`` consecutive inputs)."""

    kind: str
    n: int = 0
    m: int = 0

    def __str__(self) -> str:
        return self.kind if self.kind in ("unstructured", "structured") else f"{self.n}:{self.m}"

    @property
    def sparsity(self) -> float | None:
        """The sparsity an N:M pattern implies (None for unstructured)."""
        return None if self.kind == "unstructured" else 1.0 - self.n / self.m


def parse_pattern(spec: str) -> Pattern:
    """Parse ``"unstructured"``, ``"structured"`` (whole units: see ``fedprune.structured``) or ``"N:M"``
    (0 < N < M)."""
    if spec in ("unstructured", "structured"):
        return Pattern(spec)
    match = re.fullmatch(r"(\d+):(\d+)", str(spec).strip())
    if not match:
        raise ValueError(f"pattern must be 'unstructured', 'structured' or 'N:M', got {spec!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"N:M pattern needs 0 < N < M, got {spec!r}")
    return Pattern("nm", n, m)


def prune_lowest(scores: torch.Tensor, num_pruned: int, dim: int) -> torch.Tensor:
    """Keep-mask pruning the ``num_pruned`` lowest scores along ``dim`` (stable tie-break)."""
    if num_pruned <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    # Fast path (no tie at the threshold, no NaN): keep what is above the num_pruned-th lowest score.
    # It is exactly the mask of the stable sort, which handles ties by index; only the slices along
    # ``dim`` where the fast path keeps the wrong count (a tie or a NaN) are sorted.
    threshold = torch.topk(scores, num_pruned, dim=dim, largest=False, sorted=False).values.amax(
        dim, keepdim=True
    )
    keep = scores > threshold
    wrong = keep.sum(dim) != scores.shape[dim] - num_pruned  # (slices,) in the other dims' shape
    if not bool(wrong.any()):
        return keep
    keep_last = keep.movedim(dim, -1)  # a view: writing it writes ``keep``
    tied = scores.movedim(dim, -1)[wrong]  # (tied slices, length)
    order = torch.argsort(tied, dim=1, stable=True)
    sorted_keep = torch.ones_like(tied, dtype=torch.bool).scatter(1, order[:, :num_pruned], False)
    keep_last[wrong] = sorted_keep
    return keep


def select_unstructured(scores: torch.Tensor, sparsity: float, group: str = "layer") -> torch.Tensor:
    """Keep-mask pruning a fraction ``sparsity`` of the lowest scores within each comparison group.

    Parameters
    ----------
    scores : ``(out, in)`` importance of each weight.
    sparsity : fraction pruned, in [0, 1).
    group : ``layer`` (one threshold per matrix), ``row`` (per output row), ``column`` (per input).
    """
    check_sparsity(sparsity)
    if group == "layer":
        flat = scores.reshape(1, -1)
        return prune_lowest(flat, int(flat.shape[1] * sparsity), dim=1).reshape(scores.shape)
    if group == "row":
        return prune_lowest(scores, int(scores.shape[1] * sparsity), dim=1)
    if group == "column":
        return prune_lowest(scores, int(scores.shape[0] * sparsity), dim=0)
    raise ValueError(f"unknown comparison group {group!r}; known: {GROUPS}")


def select_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask keeping the ``n`` highest scores in every ``m`` consecutive inputs of each row."""
    out_features, in_features = scores.shape
    if in_features % m:
        raise ValueError(f"{n}:{m} needs in_features divisible by {m}, got {in_features}")
    groups = scores.reshape(out_features, in_features // m, m)
    return prune_lowest(groups, m - n, dim=2).reshape(scores.shape)


def select_mask(scores: torch.Tensor, sparsity: float, pattern: Pattern, group: str) -> torch.Tensor:
    """Keep-mask for a pattern: N:M groups, or unstructured within ``group``."""
    if pattern.kind == "nm":
        return select_nm(scores, pattern.n, pattern.m)
    return select_unstructured(scores, sparsity, group)


def check_sparsity(sparsity: float) -> None:
    """Raise ValueError unless 0 <= sparsity < 1."""
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean mask into ``ceil(numel / 8)`` uint8 bytes (big-endian bit order within a byte)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, torch.zeros(pad, dtype=torch.uint8)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (flat.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_bits` for a mask of the given shape."""
    numel = 1
    for size in shape:
        numel *= size
    if packed.dtype != torch.uint8 or packed.numel() != (numel + 7) // 8:
        raise ValueError(f"expected {(numel + 7) // 8} uint8 bytes for shape {shape}")
    shifts = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)
    bits = (packed.reshape(-1, 1) >> shifts) & 1  # (bytes, 8)
    return bits.reshape(-1)[:numel].bool().reshape(shape)


def sparsity_of(mask: torch.Tensor) -> float:
    """Fraction of pruned (False) entries."""
    return 1.0 - mask.float().mean().item()
