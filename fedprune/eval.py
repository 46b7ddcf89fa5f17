"""Perplexity on fixed windows."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

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
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] == 0:
        raise ValueError(f"need (windows>=1, tokens>=2) ids, got {tuple(windows.shape)}")
    device = next(model.parameters()).device
    nll = torch.zeros((), dtype=torch.float64)
    tokens = 0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        nll += window_nll_sum(logits, batch).double().cpu()
        tokens += batch.shape[0] * (batch.shape[1] - 1)
    return Perplexity(value=math.exp(nll.item() / tokens), tokens=tokens)
