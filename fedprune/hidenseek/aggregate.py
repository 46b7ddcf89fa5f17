"""Server-side aggregation: sign majority vote, score averaging, 1-bit sign codec, FedAvg.

Sign vectors are flat ``(n,)`` int8 in {-1, +1} holding only the *kept* weights, concatenated in the
key order of the prune-mask dict (:func:`gather_kept` / :func:`scatter_kept`); both ends must use the
same mask dict, which the server builds once and broadcasts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from fedprune.masks import pack_bits, unpack_bits

logger = logging.getLogger(__name__)


def _check_signs(signs: torch.Tensor) -> None:
    """Raise ValueError unless every entry is -1 or +1."""
    if not bool(((signs == 1) | (signs == -1)).all()):
        raise ValueError("signs must all be -1 or +1")


def majority_vote_signs(sign_stack: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """Per-weight majority of ``sign_stack (clients, n)``; a tie keeps ``current (n,)``. -> ``(n,)`` int8."""
    _check_signs(sign_stack)
    _check_signs(current)
    votes = sign_stack.to(torch.int32).sum(dim=0)  # (n,)
    return torch.where(votes == 0, current.to(torch.int32), votes.sign()).to(torch.int8)


def average_scores(score_stack: torch.Tensor, weights: Sequence[float] | None = None) -> torch.Tensor:
    """Weighted mean of real-valued scores ``(clients, n)`` -> ``(n,)``; equal weights when ``None``."""
    num_clients = score_stack.shape[0]
    w = torch.ones(num_clients) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    if w.numel() != num_clients or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError("need one non-negative weight per client with a positive sum")
    w = (w / w.sum()).to(score_stack.dtype)
    return (w.reshape(-1, 1) * score_stack).sum(dim=0)


def signs_of_scores(scores: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """``sign(scores)`` as int8, keeping ``current`` where a score is exactly 0."""
    return torch.where(scores == 0, current.to(torch.int8), torch.where(scores > 0, 1, -1).to(torch.int8))


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """1 bit per sign (``+1 -> 1``, ``-1 -> 0``): ``(n,)`` -> ``(ceil(n / 8),)`` uint8."""
    _check_signs(signs)
    return pack_bits(signs.reshape(-1) > 0)


def unpack_signs(packed: torch.Tensor, num_signs: int) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: ``(n,)`` int8 in {-1, +1}."""
    bits = unpack_bits(packed, (num_signs,))  # (n,) bool
    return torch.where(bits, 1, -1).to(torch.int8)


def num_kept_weights(masks: dict[str, torch.Tensor]) -> int:
    """Number of kept (True) entries over all masks = length of a flat sign vector."""
    return sum(int(mask.sum()) for mask in masks.values())


def gather_kept(tensors: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """The entries of ``tensors`` at kept positions, concatenated in ``masks`` key order: ``(n_kept,)``."""
    return torch.cat([tensors[name][mask] for name, mask in masks.items()])


def scatter_kept(
    flat: torch.Tensor, masks: dict[str, torch.Tensor], fill: int | float = 1
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`gather_kept`: full-shape tensors with ``fill`` at pruned positions."""
    if flat.numel() != num_kept_weights(masks):
        raise ValueError(f"got {flat.numel()} values for {num_kept_weights(masks)} kept weights")
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, mask in masks.items():
        count = int(mask.sum())
        full = torch.full(mask.shape, fill, dtype=flat.dtype)
        full[mask] = flat[offset : offset + count]
        out[name] = full
        offset += count
    return out


def fedavg(states: Sequence[dict[str, torch.Tensor]], num_samples: Sequence[int]) -> dict[str, torch.Tensor]:
    """Sample-weighted average of float parameter dicts (same keys and shapes) -> new dict."""
    if len(states) == 0 or len(states) != len(num_samples):
        raise ValueError("need one sample count per state and at least one state")
    if any(n < 0 for n in num_samples) or sum(num_samples) <= 0:
        raise ValueError("sample counts must be non-negative with a positive sum")
    total = float(sum(num_samples))
    return {
        key: sum(state[key].double() * (n / total) for state, n in zip(states, num_samples, strict=True)).to(
            states[0][key].dtype
        )
        for key in states[0]
    }


def delta_scale(delta: torch.Tensor, quantile: float) -> float:
    """The clip scale ``B``: the ``quantile`` of ``|delta|``, at least the smallest positive float32."""
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    scale = float(torch.quantile(delta.abs().double(), quantile)) if delta.numel() else 0.0
    return max(scale, float(torch.finfo(torch.float32).tiny))


def stochastic_signs(delta: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """1-bit stochastic rounding of ``delta (n,)`` at ``scale``: int8 ``+1`` w.p. ``(1 + clip(delta / scale)) / 2``.

    ``scale * signs`` is an unbiased estimate of ``delta`` where ``|delta| <= scale`` and of
    ``clip(delta, -scale, scale)`` elsewhere.
    """
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    p_plus = (1 + (delta.double() / scale).clamp(-1.0, 1.0)) / 2  # (n,)
    draw = torch.rand(delta.shape, generator=generator, dtype=torch.float64)
    return torch.where(draw < p_plus, 1, -1).to(torch.int8)


def add_score_delta(
    scores: torch.Tensor,
    sign_stack: torch.Tensor,
    scales: Sequence[float],
    weights: Sequence[float],
    server_lr: float,
) -> torch.Tensor:
    """``scores + server_lr * sum_i w_i scale_i signs_i / sum_i w_i``: the global scores after one round.

    ``sign_stack (clients, n)`` holds the sites' :func:`stochastic_signs` of their score changes and
    ``scales`` their clip scales. Returns float32 ``(n,)``.
    """
    _check_signs(sign_stack)
    if len(scales) != sign_stack.shape[0] or any(s < 0 for s in scales):
        raise ValueError("need one non-negative scale per client")
    scaled = sign_stack.double() * torch.as_tensor(scales, dtype=torch.float64).reshape(-1, 1)
    return (scores.double() + server_lr * average_scores(scaled, weights)).float()
