"""Evaluation and plain local SGD (for the dense / pruned FedAvg baselines)."""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from torch.nn import functional as F

from fedprune.hidenseek.models import apply_masks_

logger = logging.getLogger(__name__)


def minibatch_indices(num_samples: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch of shuffled index batches (the last may be smaller)."""
    if batch_size < 1 or num_samples < 1:
        raise ValueError(f"need batch_size >= 1 and num_samples >= 1, got {batch_size}, {num_samples}")
    return list(torch.split(torch.randperm(num_samples, generator=generator), batch_size))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` on ``x (n, ...)``, ``y (n,)``; the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, x.shape[0], batch_size):
        logits = model(x[start : start + batch_size])  # (batch, classes)
        correct += int((logits.argmax(dim=1) == y[start : start + batch_size]).sum())
    model.train(was_training)
    return correct / x.shape[0]


def local_sgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    momentum: float = 0.0,
    masks: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """A trained copy of ``model`` after ``epochs`` of cross-entropy SGD on ``(x, y)``.

    With ``masks`` the pruned weights are zeroed before training and after every step (pruned FedAvg).
    """
    trained = copy.deepcopy(model).train()
    if masks is not None:
        apply_masks_(trained, masks)
    optimizer = torch.optim.SGD(trained.parameters(), lr=lr, momentum=momentum)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in minibatch_indices(x.shape[0], batch_size, generator):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(trained(x[batch]), y[batch]).backward()
            optimizer.step()
            if masks is not None:
                apply_masks_(trained, masks)
    return trained
