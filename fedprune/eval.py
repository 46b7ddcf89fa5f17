"""Perplexity on fixed windows."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fedprune.models import input_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Perplexity:
    """exp(mean next-token negative log-likelihood) and the number of predicted tokens."""

    value: float
    tokens: int


def window_nll_sum(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL: ``logits`` ``(batch, tokens, vocab)``, ``input_ids`` ``(batch, tokens)``."""
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    targets = input_ids[:, 1:].reshape(-1)
    return F.cross_entropy(shifted, targets, reduction="sum")


@torch.no_grad()
def perplexity(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = False
) -> Perplexity:
    """Perplexity of ``model`` on ``(windows, tokens)`` ids, each window scored independently."""
    device = input_device(model)

    def logits_of(_index: int, batch: torch.Tensor) -> torch.Tensor:
        return model(input_ids=batch.to(device), use_cache=False).logits

    return perplexity_of(logits_of, windows, batch_size, progress)


@torch.no_grad()
def perplexity_of(
    logits_of: Callable[[int, torch.Tensor], torch.Tensor],
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: bool = False,
) -> Perplexity:
    """Perplexity from ``logits_of(i, batch)`` ``(batch, tokens, vocab)`` for micro-batch ``i`` of
    ``batch_size`` windows of ``(windows, tokens)`` ids."""
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] == 0:
        raise ValueError(f"need (windows>=1, tokens>=2) ids, got {tuple(windows.shape)}")
    nll = torch.zeros((), dtype=torch.float64)
    tokens = 0
    batches = windows.split(batch_size)
    for index, batch in enumerate(tqdm(batches, desc="perplexity", disable=not progress)):
        logits = logits_of(index, batch)
        nll += window_nll_sum(logits, batch.to(logits.device)).double().cpu()
        tokens += batch.shape[0] * (batch.shape[1] - 1)
    return Perplexity(value=math.exp(nll.item() / tokens), tokens=tokens)
