"""FedPrLLM mask voting: sum client keep-masks to counts, keep the most-kept weights per comparison group.

Ties in the counts are broken by a seeded, deterministic rule: each weight gets a fixed pseudo-random
priority in [0, 1) from ``torch.Generator().manual_seed(seed)``, added to the integer counts, so a tie
never depends on client order and never overrides a strict majority.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from fedprune.masks import Pattern, select_mask, unpack_bits

logger = logging.getLogger(__name__)


def vote_counts(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Number of clients that kept each weight: ``(clients, *shape)`` bools -> ``(*shape)`` int32."""
    if not masks:
        raise ValueError("no masks to count")
    counts = torch.zeros(masks[0].shape, dtype=torch.int32)
    for mask in masks:
        if mask.shape != counts.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} differs from {tuple(counts.shape)}")
        counts += mask.to(torch.int32)
    return counts


def counts_from_packed(packed: Sequence[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """Vote counts from bit-packed masks (one uint8 tensor per client)."""
    return vote_counts([unpack_bits(p, shape) for p in packed])


def tie_break_priority(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Deterministic pseudo-random priorities in [0, 1) for breaking ties between equal counts."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator, dtype=torch.float64)


def select_by_votes(
    counts: torch.Tensor, sparsity: float, pattern: Pattern, group: str, seed: int
) -> torch.Tensor:
    """Keep-mask of the most-kept weights within each comparison group (N:M stays valid)."""
    scores = counts.to(torch.float64) + tie_break_priority(tuple(counts.shape), seed)
    return select_mask(scores, sparsity, pattern, group)


def apply_vote(
    weight: torch.Tensor, keep: torch.Tensor, counts: torch.Tensor, num_clients: int, scaling: bool
) -> torch.Tensor:
    """Aggregated weight: dense weight × keep, optionally × the fraction of clients that kept it."""
    pruned = weight * keep
    if scaling:
        pruned = pruned * (counts.to(weight.dtype) / num_clients)
    return pruned
