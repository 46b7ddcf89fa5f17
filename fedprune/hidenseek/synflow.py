"""SynFlow: data-free iterative pruning at initialisation (Tanaka et al., NeurIPS 2020).

Each round the network is *linearised*: every parameter is replaced by its absolute value (masked
weights stay zero) and an all-ones input is pushed through it, so ReLUs and max-pools act as identity
on positive values. With ``R = sum(output)`` the synaptic saliency of a weight is
``score = |theta * dR/dtheta|``. A single global threshold across layers keeps the top weights; the
density follows the exponential schedule ``density_k = density ** (k / iterations)``, ``k = 1 ..
iterations``, and the masks are applied before the next round's scores. Biases are not pruned (but are
linearised like every other parameter). The whole computation runs on a float64 copy, since ``R`` is a
product over layers and overflows float32 for deep or wide nets. The caller's model is never modified.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from fedprune.hidenseek.models import prunable_weights
from fedprune.hidenseek.selection import global_top_k_masks, num_kept

logger = logging.getLogger(__name__)


def exponential_densities(density: float, iterations: int) -> list[float]:
    """The SynFlow schedule ``[density ** (k / iterations) for k = 1 .. iterations]`` (last = density)."""
    if iterations < 1:
        raise ValueError(f"need iterations >= 1, got {iterations}")
    return [density ** (k / iterations) for k in range(1, iterations + 1)]


def linearized_copy(model: nn.Module) -> nn.Module:
    """A float64 eval-mode copy of ``model`` with every parameter replaced by its absolute value."""
    linear = copy.deepcopy(model).double().eval().requires_grad_(True)
    with torch.no_grad():
        for parameter in linear.parameters():
            parameter.abs_()
    return linear


def synflow_scores(
    model: nn.Module, masks: dict[str, torch.Tensor], input_shape: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    """``|theta * dR/dtheta|`` (float64) of every prunable weight of the masked, linearised network.

    Parameters
    ----------
    model : the network (not modified).
    masks : name -> bool keep-mask for every prunable weight; pruned weights are zeroed first.
    input_shape : shape of one input without the batch dimension, e.g. ``(64,)``.
    """
    linear = linearized_copy(model)
    weights = prunable_weights(linear)
    with torch.no_grad():
        for name, weight in weights.items():
            weight.mul_(masks[name].double())
    linear.zero_grad(set_to_none=True)
    ones = torch.ones((1, *input_shape), dtype=torch.float64)  # (1, *input_shape)
    total_flow = linear(ones).sum()  # R
    total_flow.backward()
    return {name: (weight.grad * weight).detach().abs() for name, weight in weights.items()}


def synflow_masks(
    model: nn.Module,
    density: float,
    iterations: int = 100,
    input_shape: tuple[int, ...] = (64,),
) -> dict[str, torch.Tensor]:
    """Global SynFlow keep-masks reaching exactly ``round(density * total)`` kept weights.

    Returns
    -------
    dict[str, torch.Tensor]
        ``"<module>.weight" -> bool mask`` of the weight's shape for every Linear/Conv2d, nested across
        rounds (a weight pruned once stays pruned).
    """
    weights = prunable_weights(model)
    total = sum(weight.numel() for weight in weights.values())
    masks = {name: torch.ones_like(weight, dtype=torch.bool) for name, weight in weights.items()}
    for step_density in exponential_densities(density, iterations):
        scores = synflow_scores(model, masks, input_shape)
        masks = global_top_k_masks(scores, num_kept(total, step_density), previous=masks)
    logger.info("synflow: kept %d of %d weights after %d rounds", num_kept(total, density), total, iterations)
    return masks
