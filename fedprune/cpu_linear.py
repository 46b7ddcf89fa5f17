"""Float32 ``nn.Linear`` layers on CPU through oneDNN during the calibration block passes.

torch sends a float32 ``nn.Linear`` on an x86 CPU to MKL's sgemm. oneDNN (torch's own ``mkldnn``
backend, the one it already uses for bfloat16) computes the same products to float32 rounding, and on
the AMD EPYC (Zen 4) of our benchmarks a pass over SmolLM2's blocks takes 0.85x MKL's CPU time
(``python experiments/probes/block_pass_ab.py linear``). :func:`onednn_linears` switches a block's plain
``nn.Linear`` layers to it for the duration of a block pass; calls it cannot serve exactly as asked
(another dtype or device, gradients) fall back to ``F.linear``.

``FEDPRUNE_LINEAR=torch`` turns it off (``onednn``, the default, keeps it on where available): for A/B
benchmarks and for a CPU on which MKL is the faster one. oneDNN's rounding differs from MKL's, so a
run's results move at float32 rounding level between the two settings; within one setting they are
deterministic, and federated and centralized runs still agree exactly.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

ENV = "FEDPRUNE_LINEAR"
BACKENDS = ("onednn", "torch")


def linear_backend() -> str:
    """The backend asked for by ``FEDPRUNE_LINEAR`` (default ``onednn``); an unknown value is an error."""
    value = os.environ.get(ENV, "onednn").strip().lower() or "onednn"
    if value not in BACKENDS:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(BACKENDS)}")
    return value


def _onednn_op():
    return torch.ops.mkldnn._linear_pointwise


@functools.cache
def onednn_available() -> bool:
    """Whether this torch and CPU have oneDNN's float32 linear, checked once against ``F.linear``."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(3, 5, 16, generator=generator)  # (batch, tokens, in)
        weight = torch.randn(8, 16, generator=generator)  # (out, in)
        bias = torch.randn(8, generator=generator)
        got = _onednn_op()(x, weight, bias, "none", [], "")
        ok = got.shape == (3, 5, 8) and torch.allclose(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    except Exception as error:  # an older or newer torch without the op, or a broken build
        logger.info("oneDNN linear unavailable (%s): F.linear is used", error)
        return False
    if not ok:
        logger.warning("oneDNN linear disagrees with F.linear on a self-test: F.linear is used")
    return ok


def _onednn_forward(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight, bias = layer.weight, layer.bias
    if (
        x.dtype is torch.float32
        and weight.dtype is torch.float32
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dim() >= 2
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        return _onednn_op()(x, weight.detach(), None if bias is None else bias.detach(), "none", [], "")
    return F.linear(x, weight, bias)


@contextmanager
def onednn_linears(module: nn.Module) -> Iterator[int]:
    """Within the context, the plain ``nn.Linear`` layers of ``module`` compute through oneDNN (when
    available and not turned off); yields how many were switched. Hooks still run; on exit each layer's
    own ``forward`` is back."""
    if linear_backend() != "onednn" or not onednn_available():
        yield 0
        return
    layers = [m for m in module.modules() if type(m) is nn.Linear and "forward" not in m.__dict__]
    for layer in layers:
        layer.forward = functools.partial(_onednn_forward, layer)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
