"""Differential privacy for summed statistics: token clipping, Gaussian noise, zCDP accounting.

Neighbouring datasets: one calibration window of ``seq_len`` tokens at one site is replaced by another
(token counts, fixed by the configuration, are public). Every token's layer-input vector is clipped to
L2 norm ``bound`` before it enters the statistics, so one window's contribution ``a`` to a layer's
statistic (Wanda ``Σ_t x_t²`` or the Gram ``Σ_t x_t x_tᵀ``) has norm at most ``seq_len · bound²``
(``‖x xᵀ‖_F = ‖x‖²`` and ``‖x²‖_2 <= ‖x‖²``). Replacing it by ``b`` moves the statistic by
``‖a − b‖² = ‖a‖² + ‖b‖² − 2⟨a, b⟩ <= 2 (seq_len · bound²)²``, because ``⟨a, b⟩ >= 0`` (non-negative
vectors; positive semidefinite matrices): ``√2 · seq_len · bound²``, attained by two one-token windows
along orthogonal axes. The Gram's upper triangle, which is what travels, has at most the Frobenius
norm of the full matrix. A block of ``slots`` distinct layer inputs moves by ``sqrt(slots)`` times that.
Each block is one release of the Gaussian mechanism (an allocation rule such as OWL adds one release of
every dense block's statistics); releases compose (adaptively) in zero-concentrated DP (Bun & Steinke
2016): ``rho = Σ_r Δ_r² / (2 σ²)`` (``releases · Δ² / (2 σ²)`` for equal ones), converted
to ``(epsilon, delta)`` with ``epsilon = rho + 2 sqrt(rho ln(1/delta))``.

Distributed noise: each site adds ``N(0, σ² / min_sites)``; the server only ever sees (under secure
aggregation) a sum of at least ``min_sites`` (the Shamir threshold) sites' noise, variance >= ``σ²``.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from fedprune.stat_kinds import STAT_KINDS, StatKind, get_stat_kind
from fedprune.stat_kinds import psd_project as psd_project  # public here too (DP post-processing)

logger = logging.getLogger(__name__)


def clip_tokens(x: torch.Tensor, bound: float) -> torch.Tensor:
    """Scale every token vector (last dim) of ``x`` to L2 norm at most ``bound`` (unchanged if within)."""
    if not bound > 0:
        raise ValueError(f"bound must be > 0, got {bound}")
    norms = torch.linalg.vector_norm(x.double(), dim=-1, keepdim=True)  # (..., 1)
    factor = torch.clamp(bound / torch.clamp(norms, min=1e-300), max=1.0)
    return torch.where(norms > bound, (x.double() * factor).to(x.dtype), x)


def window_sensitivity(seq_len: int, bound: float, slots: int, kind: str | StatKind | None = None) -> float:
    """L2 sensitivity of one block's statistics to replacing one window: ``√2 · seq_len · bound² · √slots``.

    Per slot, the kind's ``window_sensitivity``; ``kind=None``: the largest over the registered kinds
    (``sq_norm``, ``hessian``: ``√2 · seq_len · bound²``; ``moments`` more, for its signed Σx).
    """
    if seq_len < 1 or slots < 1 or not bound > 0:
        raise ValueError("seq_len and slots must be >= 1 and bound > 0")
    kinds = STAT_KINDS.values() if kind is None else [get_stat_kind(kind)]
    return max(spec.window_sensitivity(seq_len, bound) for spec in kinds) * math.sqrt(slots)


def gaussian_rho(sensitivity: float, sigma: float, releases: int = 1) -> float:
    """zCDP of ``releases`` Gaussian mechanisms with L2 ``sensitivity`` and noise std ``sigma``."""
    if not sigma > 0 or sensitivity < 0 or releases < 1:
        raise ValueError("sigma must be > 0, sensitivity >= 0, releases >= 1")
    return releases * sensitivity**2 / (2.0 * sigma**2)


def composed_sensitivity(sensitivities: list[float]) -> float:
    """The L2 sensitivity of one Gaussian release whose zCDP equals that of releases with these
    sensitivities and the same noise std: ``sqrt(Σ Δ_r²)`` (``rho = Σ Δ_r² / (2 σ²)``)."""
    if not sensitivities or min(sensitivities) < 0:
        raise ValueError("sensitivities must be a non-empty list of values >= 0")
    return math.sqrt(sum(d * d for d in sensitivities))


def check_delta(delta: float) -> float:
    """Validate delta in (0, 1)."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return float(delta)


def rho_to_epsilon(rho: float, delta: float) -> float:
    """``(epsilon, delta)``-DP implied by ``rho``-zCDP: ``epsilon = rho + 2 sqrt(rho ln(1/delta))``."""
    if rho < 0:
        raise ValueError(f"rho must be >= 0, got {rho}")
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / check_delta(delta)))


def epsilon_to_rho(epsilon: float, delta: float) -> float:
    """The largest ``rho`` whose ``rho_to_epsilon`` is ``epsilon`` (inverse of :func:`rho_to_epsilon`)."""
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    log_term = math.log(1.0 / check_delta(delta))
    return (math.sqrt(log_term + epsilon) - math.sqrt(log_term)) ** 2


def calibrate_sigma(epsilon: float, delta: float, sensitivity: float, releases: int) -> float:
    """Noise std ``σ`` of the summed statistic so that ``releases`` releases are ``(epsilon, delta)``-DP."""
    rho = epsilon_to_rho(epsilon, delta)
    return sensitivity * math.sqrt(releases / (2.0 * rho))


def site_noise(shape: tuple[int, ...], sigma: float, min_sites: int, rng: np.random.Generator) -> np.ndarray:
    """One site's share of the noise: ``N(0, σ² / min_sites)`` per entry, float64."""
    if min_sites < 1 or sigma < 0:
        raise ValueError("min_sites must be >= 1 and sigma >= 0")
    return rng.normal(0.0, sigma / math.sqrt(min_sites), size=shape)
