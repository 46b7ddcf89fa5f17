"""The public parameters of one run's secure aggregation (and DP), fixed by the server from its config.

Everything here is public: the configuration, the model's shape, the number of sites. Nothing depends
on any site's values. The server sends ``to_config()`` with every secure-aggregation message.

Encoding of statistics (per layer slot, all slots share the bound): each site's statistic is a sum
over at most ``max_tokens`` tokens (``data.calib_windows · data.seq_len``, public) of ``x_i x_j`` with
token vectors of L2 norm at most ``token_bound``, so every entry is within ``clip = max_tokens ·
token_bound²`` (plus ``8 σ_site`` of DP noise). ``FixedPoint.for_bound(clip, max_sites, modulus_bits)``
takes the finest scale ``2^-scale_bits`` at which ``max_sites`` such values cannot overflow, with
deterministic round-half-to-even; the decoded sum of ``n`` sites is within ``n · 2^-(scale_bits+1)`` of
the exact float sum per entry (``FixedPoint.error_bound``). ``value_words`` 1.5 (the ``secagg``
default) or 2 (``TwoLimbFixedPoint``) add a low part of ``low_bits`` more bits per entry (28 with 8
sites, in 32-bit fields two to a word; or 59, one word each, exact to float64 precision), which
SparseGPT needs (its sequential OBS updates turn a 2^-27 resolution into a ±1–2% perplexity change), at
1.5 or 2 times the one-word upload. Without DP the token vectors are not clipped
(so ``secagg`` computes the same statistics as ``none``); an entry beyond ``clip`` is clipped to it and
logged. Token counts use ``IntegerCode(max_tokens)``: exact.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

from fedprune.secure.dp import (
    calibrate_sigma,
    composed_sensitivity,
    gaussian_rho,
    rho_to_epsilon,
    window_sensitivity,
)
from fedprune.secure.encoding import FixedPoint, IntegerCode, TwoLimbFixedPoint

logger = logging.getLogger(__name__)

PRIVACY_SETTINGS = ("none", "secagg", "secagg_dp")
# words per statistic entry: FixedPoint, TwoLimbFixedPoint with 2 or 1 low parts per word
VALUE_WORDS = (1, 1.5, 2)


@dataclass(frozen=True)
class SecurePlan:
    """Public parameters of secure aggregation (``dp_sigma`` > 0: with distributed Gaussian noise)."""

    threshold: int
    modulus_bits: int
    max_sites: int
    max_tokens: int
    token_bound: float
    value_words: float = 1.0  # words per statistic entry: 1 (FixedPoint), 1.5 or 2 (TwoLimbFixedPoint)
    dp_sigma: float = 0.0  # std of the noise in the SUM; each site adds std dp_sigma / sqrt(threshold)
    dp_epsilon: float = 0.0
    dp_delta: float = 0.0

    @property
    def site_sigma(self) -> float:
        """Noise std each site adds per entry."""
        return self.dp_sigma / math.sqrt(self.threshold)

    def value_code(self) -> FixedPoint | TwoLimbFixedPoint:
        """Fixed-point code of statistic entries (see the module docstring)."""
        clip = self.max_tokens * self.token_bound**2 + 8.0 * self.site_sigma
        if self.value_words == 1:
            return FixedPoint.for_bound(clip, self.max_sites, self.modulus_bits)
        low_per_word = {1.5: 2, 2: 1}[self.value_words]
        return TwoLimbFixedPoint.for_bound(clip, self.max_sites, self.modulus_bits, low_per_word)

    def count_code(self) -> IntegerCode:
        """Exact code of token counts."""
        return IntegerCode(self.max_tokens, self.max_sites, self.modulus_bits)

    def to_config(self) -> dict:
        """Flat ``secagg.<field>`` entries for a message config."""
        return {f"secagg.{k}": v for k, v in asdict(self).items()}

    @classmethod
    def from_config(cls, config) -> SecurePlan:
        """Inverse of :meth:`to_config` (``config``: any mapping holding those keys)."""
        ints = {"threshold", "modulus_bits", "max_sites", "max_tokens"}
        fields = cls.__dataclass_fields__
        return cls(**{k: (int if k in ints else float)(config[f"secagg.{k}"]) for k in fields})


def make_plan(
    *,
    threshold: int,
    modulus_bits: int,
    max_sites: int,
    max_tokens: int,
    token_bound: float,
    value_words: float = 1,
    epsilon: float | None = None,
    delta: float | None = None,
    seq_len: int = 1,
    releases: int = 1,
    slots: int = 1,
    stat_kind: str | None = None,
    dense_slots: int = 0,
    dense_kind: str | None = None,
) -> SecurePlan:
    """A plan; with ``epsilon`` and ``delta``, ``dp_sigma`` is calibrated for ``releases`` block releases
    of at most ``slots`` statistics each of kind ``stat_kind`` (sensitivity :func:`window_sensitivity`; None:
    the largest of the registered kinds), plus, if ``dense_slots`` > 0, one release of ``dense_slots``
    statistics of kind ``dense_kind`` (an allocation rule's sum of every dense block, e.g. OWL's Σx²),
    all with the same noise std: zCDP composes, ``rho = Σ_r Δ_r² / (2 σ²)``."""
    base = dict(
        threshold=threshold,
        modulus_bits=modulus_bits,
        max_sites=max_sites,
        max_tokens=max_tokens,
        token_bound=float(token_bound),
        value_words=float(value_words),
    )
    if base["value_words"] not in VALUE_WORDS:
        raise ValueError(f"value_words must be one of {VALUE_WORDS}, got {value_words!r}")
    if epsilon is None:
        return SecurePlan(**base)
    sensitivities = [window_sensitivity(seq_len, token_bound, slots, stat_kind)] * releases
    if dense_slots > 0:
        sensitivities.append(window_sensitivity(seq_len, token_bound, dense_slots, dense_kind))
    sensitivity = composed_sensitivity(sensitivities)  # one release with this Δ: the same rho
    sigma = calibrate_sigma(epsilon, float(delta), sensitivity, 1)
    achieved = rho_to_epsilon(gaussian_rho(sensitivity, sigma, 1), float(delta))
    logger.info(
        "DP: sensitivity %.4g per block release, %d releases%s, sigma %.4g -> epsilon %.4g, delta %.2g",
        sensitivities[0],
        releases,
        f" + a dense release of {dense_slots} statistics" if dense_slots > 0 else "",
        sigma,
        achieved,
        delta,
    )
    return SecurePlan(**base, dp_sigma=sigma, dp_epsilon=achieved, dp_delta=float(delta))
