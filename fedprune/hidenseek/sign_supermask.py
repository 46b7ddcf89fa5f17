"""Sign (and binary) supermasks over frozen random weights, trained with a straight-through estimator.

A prunable layer with frozen initial weight ``w``, server prune mask ``m`` and real-valued trainable
``score`` uses the effective weight

* sign supermask (HideNseek): ``m * s * w`` with ``s = sign(score)`` in {-1, +1} (``s = +1`` at 0);
* binary supermask (FedMask / lottery-ticket baseline): ``m * b * w`` with ``b = 1[score >= 0]``.

Both quantisers are straight-through: the backward pass treats them as the identity, so
``d loss / d score = d loss / d gate``. By default the gradient is passed unclipped (``clip=None``);
with ``clip=c`` it is zeroed where ``|score| > c`` (the hard-tanh STE of Hubara et al. / Courbariaux
et al.). Unclipped is the default because scores restart from ``±init_scale`` every round, so they never
drift far from zero within a round.

Both kinds are described by a *code* in {-1, +1} per weight (the sign itself, or ``2b - 1``), which is
what clients upload (one bit per kept weight) and what the server votes on. Scores start at
``code * init_scale``, so a client starting a round computes exactly the current global model. Weights,
biases and prune masks are buffers: nothing but the scores is ever trained.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from torch.nn import functional as F

from fedprune.hidenseek.models import PRUNABLE_TYPES
from fedprune.hidenseek.train import minibatch_indices

logger = logging.getLogger(__name__)

KINDS = ("sign", "binary")


class _SignSTE(torch.autograd.Function):
    """Forward ``+1 if score >= 0 else -1``; backward identity, optionally zeroed where ``|score| > clip``."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, clip: float | None) -> torch.Tensor:
        ctx.save_for_backward(scores)
        ctx.clip = clip
        return torch.where(scores >= 0, 1.0, -1.0).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _clipped(grad, ctx.saved_tensors[0], ctx.clip), None


class _BinarySTE(torch.autograd.Function):
    """Forward ``1 if score >= 0 else 0``; backward identity, optionally zeroed where ``|score| > clip``."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, clip: float | None) -> torch.Tensor:
        ctx.save_for_backward(scores)
        ctx.clip = clip
        return (scores >= 0).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _clipped(grad, ctx.saved_tensors[0], ctx.clip), None


def _clipped(grad: torch.Tensor, scores: torch.Tensor, clip: float | None) -> torch.Tensor:
    """``grad`` where ``|score| <= clip`` and 0 elsewhere; ``grad`` unchanged when ``clip`` is None."""
    return grad if clip is None else grad * (scores.abs() <= clip).to(grad.dtype)


def sign_ste(scores: torch.Tensor, clip: float | None = None) -> torch.Tensor:
    """Straight-through ``sign`` with ``sign(0) = +1``."""
    return _SignSTE.apply(scores, clip)


def binary_ste(scores: torch.Tensor, clip: float | None = None) -> torch.Tensor:
    """Straight-through step ``1[score >= 0]``."""
    return _BinarySTE.apply(scores, clip)


class SupermaskLayer(nn.Module):
    """A Linear or Conv2d with frozen weights whose effective weight is ``mask * gate(scores) * weight``."""

    def __init__(
        self,
        layer: nn.Linear | nn.Conv2d,
        prune_mask: torch.Tensor,
        codes: torch.Tensor,
        kind: str = "sign",
        init_scale: float = 0.1,
        clip: float | None = None,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown supermask kind {kind!r}; known: {KINDS}")
        if init_scale <= 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        weight = layer.weight.detach()
        if prune_mask.shape != weight.shape or codes.shape != weight.shape:
            shapes = (
                f"mask {tuple(prune_mask.shape)}, codes {tuple(codes.shape)}, weight {tuple(weight.shape)}"
            )
            raise ValueError(f"shapes differ: {shapes}")
        self.kind = kind
        self.clip = clip
        self.register_buffer("weight", weight.clone())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        self.register_buffer("prune_mask", prune_mask.detach().to(torch.bool).clone())
        self.scores = nn.Parameter(codes.detach().to(weight.dtype) * init_scale)
        if isinstance(layer, nn.Conv2d):
            self.conv = {
                "stride": layer.stride,
                "padding": layer.padding,
                "dilation": layer.dilation,
                "groups": layer.groups,
            }
        else:
            self.conv = None

    def gate(self) -> torch.Tensor:
        """``sign(scores)`` in {-1, +1} or ``1[scores >= 0]`` in {0, 1}, straight-through."""
        quantise = sign_ste if self.kind == "sign" else binary_ste
        return quantise(self.scores, self.clip)

    def effective_weight(self) -> torch.Tensor:
        """``prune_mask * gate * weight``, the weight the layer computes with."""
        return self.prune_mask.to(self.weight.dtype) * self.gate() * self.weight

    def codes(self) -> torch.Tensor:
        """Current code per weight: int8 ``+1`` where ``score >= 0``, else ``-1`` (pruned ones included)."""
        return torch.where(self.scores.detach() >= 0, 1, -1).to(torch.int8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.effective_weight()
        if self.conv is None:
            return F.linear(x, weight, self.bias)
        return F.conv2d(x, weight, self.bias, **self.conv)


def to_supermask(
    model: nn.Module,
    prune_masks: dict[str, torch.Tensor],
    codes: dict[str, torch.Tensor] | None = None,
    kind: str = "sign",
    init_scale: float = 0.1,
    clip: float | None = None,
) -> nn.Module:
    """A copy of ``model`` with every Linear/Conv2d replaced by a :class:`SupermaskLayer`.

    Parameters
    ----------
    model : plain network holding the frozen initial weights (not modified).
    prune_masks : ``"<module>.weight" -> bool`` keep-mask for every prunable layer.
    codes : ``"<module>.weight" -> {-1, +1}`` current global codes; ``None`` means all ``+1`` (the
        pruned random network itself).
    kind : ``sign`` (HideNseek) or ``binary`` (FedMask-style baseline).
    """
    if isinstance(model, PRUNABLE_TYPES):
        raise ValueError("model is a bare layer; wrap it in nn.Sequential")
    converted = copy.deepcopy(model)
    layers = [(n, m) for n, m in converted.named_modules() if isinstance(m, PRUNABLE_TYPES)]
    for name, layer in layers:
        key = f"{name}.weight"
        layer_codes = torch.ones_like(layer.weight, dtype=torch.int8) if codes is None else codes[key]
        supermask = SupermaskLayer(layer, prune_masks[key], layer_codes, kind, init_scale, clip)
        converted.set_submodule(name, supermask)
    return converted


def to_sign_supermask(
    model: nn.Module,
    prune_masks: dict[str, torch.Tensor],
    signs: dict[str, torch.Tensor] | None = None,
    init_scale: float = 0.1,
    clip: float | None = None,
) -> nn.Module:
    """HideNseek model: effective weight ``mask * s * w`` with trainable scores, see :func:`to_supermask`."""
    return to_supermask(model, prune_masks, signs, "sign", init_scale, clip)


def to_binary_supermask(
    model: nn.Module,
    prune_masks: dict[str, torch.Tensor],
    codes: dict[str, torch.Tensor] | None = None,
    init_scale: float = 0.1,
    clip: float | None = None,
) -> nn.Module:
    """Binary-supermask baseline: effective weight ``mask * b * w``, ``b = (code + 1) / 2``."""
    return to_supermask(model, prune_masks, codes, "binary", init_scale, clip)


def supermask_layers(model: nn.Module) -> dict[str, SupermaskLayer]:
    """``"<module>.weight" -> SupermaskLayer`` in module order."""
    return {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, SupermaskLayer)}


def learned_codes(model: nn.Module) -> dict[str, torch.Tensor]:
    """``"<module>.weight" -> int8 {-1, +1}`` codes (signs, or ``2b - 1``) of a supermask model."""
    return {key: layer.codes() for key, layer in supermask_layers(model).items()}


def materialize(model: nn.Module) -> nn.Module:
    """A plain copy of a supermask model whose Linear/Conv2d weights are the effective weights."""
    plain = copy.deepcopy(model)
    for key, layer in supermask_layers(plain).items():
        name = key.removesuffix(".weight")
        weight = layer.effective_weight().detach()
        if layer.conv is None:
            out_features, in_features = weight.shape
            dense: nn.Module = nn.Linear(in_features, out_features, bias=layer.bias is not None)
        else:
            out_channels, in_per_group, kh, kw = weight.shape
            dense = nn.Conv2d(
                in_per_group * layer.conv["groups"],
                out_channels,
                (kh, kw),
                bias=layer.bias is not None,
                **layer.conv,
            )
        with torch.no_grad():
            dense.weight.copy_(weight)
            if layer.bias is not None:
                dense.bias.copy_(layer.bias)
        plain.set_submodule(name, dense)
    return plain


def train_scores(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    optimizer: str = "sgd",
    momentum: float = 0.9,
) -> nn.Module:
    """A copy of a supermask model whose scores (and nothing else) were trained by cross-entropy.

    ``optimizer`` is ``sgd`` (with ``momentum``, the default) or ``adam``; no weight decay. Batches are
    drawn from a generator seeded with ``seed``. SGD is the default because on digits (MLP, density 0.5,
    3 clients) it converged more steadily than Adam, whose per-coordinate normalisation lets even tiny
    but consistent gradients flip a sign; with SGD a score moves ``lr * dL/dgate * mask * w`` per step,
    so weights with little influence rarely flip. What flips a sign within a round is ``lr`` relative
    to ``init_scale``.
    """
    trained = copy.deepcopy(model).train()
    scores = [layer.scores for layer in supermask_layers(trained).values()]
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(scores, lr=lr)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(scores, lr=lr, momentum=momentum)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: adam, sgd")
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in minibatch_indices(x.shape[0], batch_size, generator):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(trained(x[batch]), y[batch]).backward()
            opt.step()
    return trained


def local_train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    optimizer: str = "sgd",
    momentum: float = 0.9,
) -> dict[str, torch.Tensor]:
    """One client's round: train the scores of a copy of ``model`` and return its new codes (signs).

    ``model`` is not modified. Returns ``"<module>.weight" -> int8 {-1, +1}`` for every layer.
    """
    trained = train_scores(model, x, y, epochs, lr, batch_size, seed, optimizer, momentum)
    return learned_codes(trained)
