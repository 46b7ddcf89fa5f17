"""Small classifiers for 8x8 digits whose prunable layers are ``nn.Linear`` and ``nn.Conv2d``.

Both take flattened images ``(batch, 64)``; the CNN reshapes to ``(batch, 1, 8, 8)`` itself, so data,
SynFlow's all-ones input and the training loops are the same for both. Layers have no bias by default,
as in the supermask literature (a bias would stay frozen under a sign supermask anyway).

Initialisation is deterministic from a seed (a local ``torch.Generator``):

* ``kaiming_normal`` (default): ``w ~ N(0, 2 / fan_in)`` (He et al., ReLU gain). Magnitudes differ,
  so SynFlow and magnitude pruning see different saliencies.
* ``signed_constant``: ``w = ±sqrt(2 / fan_in)`` with a random sign (Ramanujan et al. 2020). Every
  weight of a layer has the same magnitude; a sign supermask then only chooses signs.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

logger = logging.getLogger(__name__)

IN_FEATURES = 64
NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)
INIT_SCHEMES = ("kaiming_normal", "signed_constant")
PRUNABLE_TYPES = (nn.Linear, nn.Conv2d)


class MLP(nn.Module):
    """``64 -> hidden -> hidden -> 10`` with ReLU."""

    def __init__(self, hidden: int = 128, bias: bool = False) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(IN_FEATURES, hidden, bias=bias),
            nn.ReLU(),
            nn.Linear(hidden, hidden, bias=bias),
            nn.ReLU(),
            nn.Linear(hidden, NUM_CLASSES, bias=bias),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # (batch, 10)


class SmallCNN(nn.Module):
    """conv3x3 -> ReLU -> conv3x3 -> ReLU -> maxpool2 -> fc, on ``1x8x8`` images."""

    def __init__(self, channels: tuple[int, int] = (16, 32), bias: bool = False) -> None:
        super().__init__()
        first, second = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, first, kernel_size=3, padding=1, bias=bias),
            nn.ReLU(),
            nn.Conv2d(first, second, kernel_size=3, padding=1, bias=bias),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(second * 4 * 4, NUM_CLASSES, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x.reshape(-1, *IMAGE_SHAPE)  # (batch, 1, 8, 8)
        features = self.features(images)  # (batch, second, 4, 4)
        return self.classifier(features.flatten(1))  # (batch, 10)


def init_weights_(model: nn.Module, seed: int, scheme: str = "kaiming_normal") -> nn.Module:
    """Re-initialise every prunable weight in place from ``seed``; biases are set to zero."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; known: {INIT_SCHEMES}")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, PRUNABLE_TYPES):
                continue
            if scheme == "kaiming_normal":
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=generator)
            else:
                fan_in = module.weight[0].numel()
                signs = torch.randint(0, 2, module.weight.shape, generator=generator) * 2 - 1
                module.weight.copy_(signs * math.sqrt(2.0 / fan_in))
            if module.bias is not None:
                module.bias.zero_()
    return model


def build_model(
    arch: str,
    seed: int,
    init: str = "kaiming_normal",
    hidden: int = 128,
    channels: tuple[int, int] = (16, 32),
    bias: bool = False,
) -> nn.Module:
    """``mlp`` or ``cnn``, initialised deterministically from ``seed``."""
    if arch == "mlp":
        model: nn.Module = MLP(hidden=hidden, bias=bias)
    elif arch == "cnn":
        model = SmallCNN(channels=channels, bias=bias)
    else:
        raise ValueError(f"unknown arch {arch!r}; known: mlp, cnn")
    return init_weights_(model, seed, init)


def prunable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>.weight": weight}`` of every Linear/Conv2d, in module order (biases excluded)."""
    return {
        f"{name}.weight": module.weight
        for name, module in model.named_modules()
        if isinstance(module, PRUNABLE_TYPES)
    }


def apply_masks_(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Zero the pruned (False) entries of each masked weight in place."""
    weights = prunable_weights(model)
    with torch.no_grad():
        for name, mask in masks.items():
            weights[name].mul_(mask.to(weights[name].dtype))
    return model


def masks_density(masks: dict[str, torch.Tensor]) -> float:
    """Fraction of kept (True) entries over all masks together."""
    kept = sum(int(mask.sum()) for mask in masks.values())
    total = sum(mask.numel() for mask in masks.values())
    return kept / total
