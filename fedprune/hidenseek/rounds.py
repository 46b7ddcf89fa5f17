"""The global HideNseek model from its state: codes over the kept weights of the server's prune masks.

Global state is a flat ``(n_kept,)`` int8 code vector (signs, or ``2b - 1`` for the binary baseline)
over the kept weights, in mask key order (or float32 scores with ``aggregation=score_delta``). The
rounds themselves are ``fedprune/hidenseek/server.py`` and ``site.py`` (tests run them in process).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from fedprune.hidenseek.aggregate import (
    num_kept_weights,
    scatter_kept,
)
from fedprune.hidenseek.sign_supermask import supermask_layers, to_supermask

logger = logging.getLogger(__name__)


def initial_codes(prune_masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """All ``+1``: the global model starts as the pruned random network itself. ``(n_kept,)`` int8."""
    return torch.ones(num_kept_weights(prune_masks), dtype=torch.int8)


def global_model(
    base_model: nn.Module,
    prune_masks: dict[str, torch.Tensor],
    codes: torch.Tensor,
    kind: str = "sign",
    init_scale: float = 0.1,
) -> nn.Module:
    """Supermask model of the flat global ``codes`` over the frozen weights of ``base_model``."""
    full_codes = scatter_kept(codes, prune_masks, fill=1)
    return to_supermask(base_model, prune_masks, full_codes, kind, init_scale)


def codes_of_scores(scores: torch.Tensor) -> torch.Tensor:
    """int8 ``+1`` where ``score >= 0``, else ``-1`` (the supermask's own rule): ``(n,)`` -> ``(n,)``."""
    return torch.where(scores >= 0, 1, -1).to(torch.int8)


def set_kept_scores_(
    model: nn.Module, kept_scores: torch.Tensor, prune_masks: dict[str, torch.Tensor]
) -> None:
    """Overwrite the scores of the kept weights of a supermask ``model`` with ``kept_scores (n_kept,)``."""
    layers = supermask_layers(model)
    full = scatter_kept(kept_scores, prune_masks, fill=0.0)
    with torch.no_grad():
        for key, mask in prune_masks.items():
            layers[key].scores[mask] = full[key][mask].to(layers[key].scores.dtype)
