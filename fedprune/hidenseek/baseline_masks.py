"""Data-free pruning baselines at initialisation, with the same global density as SynFlow."""

from __future__ import annotations

import logging

import torch
from torch import nn

from fedprune.hidenseek.models import prunable_weights
from fedprune.hidenseek.selection import global_top_k_masks, num_kept

logger = logging.getLogger(__name__)


def magnitude_masks_at_init(model: nn.Module, density: float) -> dict[str, torch.Tensor]:
    """Keep the ``round(density * total)`` largest ``|w|`` of all prunable weights (one global threshold)."""
    scores = {name: weight.detach().abs() for name, weight in prunable_weights(model).items()}
    total = sum(score.numel() for score in scores.values())
    return global_top_k_masks(scores, num_kept(total, density))


def random_masks(model: nn.Module, density: float, seed: int) -> dict[str, torch.Tensor]:
    """Keep a seeded uniformly random ``round(density * total)`` of all prunable weights (global)."""
    generator = torch.Generator().manual_seed(seed)
    scores = {
        name: torch.rand(weight.shape, generator=generator, dtype=torch.float64)
        for name, weight in prunable_weights(model).items()
    }
    total = sum(score.numel() for score in scores.values())
    return global_top_k_masks(scores, num_kept(total, density))
