"""Global (cross-layer) top-k selection of weights by score: one threshold for the whole network.

Ties are broken deterministically by a stable sort over the scores concatenated in dict order: among
equal scores the entry with the lower position in that concatenation is pruned first.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def num_kept(total: int, density: float) -> int:
    """How many of ``total`` weights a global ``density`` keeps: ``round(density * total)``."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return round(density * total)


def global_top_k_masks(
    scores: dict[str, torch.Tensor],
    keep: int,
    previous: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks holding the ``keep`` highest scores over all tensors together.

    Parameters
    ----------
    scores : name -> score tensor (any shapes).
    keep : number of entries kept over all tensors.
    previous : optional name -> bool mask; entries already pruned there stay pruned (their score is
        treated as ``-inf``), so successive calls with shrinking ``keep`` give nested masks.
    """
    names = list(scores)
    flat = torch.cat([scores[name].detach().reshape(-1).double() for name in names])  # (total,)
    if previous is not None:
        alive = torch.cat([previous[name].reshape(-1) for name in names])  # (total,)
        flat = flat.masked_fill(~alive, float("-inf"))
    total = flat.numel()
    if not 0 <= keep <= total:
        raise ValueError(f"cannot keep {keep} of {total} weights")
    order = torch.argsort(flat, stable=True)  # ascending
    kept = torch.ones(total, dtype=torch.bool)
    kept[order[: total - keep]] = False
    masks: dict[str, torch.Tensor] = {}
    for name, chunk in zip(names, torch.split(kept, [scores[n].numel() for n in names]), strict=True):
        masks[name] = chunk.reshape(scores[name].shape).clone()
    return masks
