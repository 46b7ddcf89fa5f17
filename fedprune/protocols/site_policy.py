"""A site's own floors on the secure-aggregation and DP parameters the server sends (``SecurePlan``).

The server fixes the plan and sends it with every ``train.secagg`` message; a site checks it against
its :class:`SitePolicy` (built from its node config, :meth:`SitePolicy.from_node_config`) before it does
anything, and refuses with a :class:`PolicyError` naming the parameter and the floor it misses (the
site is then a dropout on the server, and the reason reaches the server's log and ``rejected``).

Node config keys (all optional):

- ``secagg-sites``: how many sites the federation has (default: ``num-partitions``; unknown: the plan's
  ``max_sites``). The plan's ``max_sites`` must equal it, and the server may route at most that many
  minus one neighbours.
- ``secagg-honest-majority`` (default true): the threshold must exceed half of the sites, so no
  minority of colluding parties can unmask a site. ``false`` drops this floor (tests of dropouts with
  small federations do); ``secagg-min-threshold`` (default 2) still applies.
- ``secagg-min-modulus-bits`` (default 32): sums modulo ``2^k`` with fewer bits wrap (exactness).
- ``dp-max-epsilon`` with ``dp-delta`` (default 1e-5): the site only releases DP-noised statistics
  (``dp_sigma > 0``) with a noise std per release at least :func:`min_sigma` (the server's calibration
  of ``dp.py`` for the site's ``(epsilon, delta)`` over its model's blocks); ``dp-max-token-bound``: the
  largest clip ``A`` it accepts. The lifetime budget of the site's data (:mod:`dp_ledger`) is
  ``dp-budget-rho``, else the zCDP of ``(dp-max-epsilon, dp-delta)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedprune.secure.dp import calibrate_sigma, epsilon_to_rho, gaussian_rho, window_sensitivity
from fedprune.secure.plan import SecurePlan

logger = logging.getLogger(__name__)

DEFAULT_MIN_MODULUS_BITS = 32
DEFAULT_DELTA = 1e-5


class PolicyError(ValueError):
    """The server's plan misses one of this site's floors; the message names the parameter and floor."""


def _flag(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"expected true or false, got {value!r}")
    return text in ("true", "1", "yes")


def _optional(node: Mapping, key: str, kind: type):
    if key not in node:
        return None
    try:
        return kind(node[key]) if kind is not bool else _flag(node[key])
    except (TypeError, ValueError) as error:
        raise ValueError(f"node config {key!r} = {node[key]!r}: {error}") from None


def _refuse(parameter: str, value, floor: str) -> None:
    raise PolicyError(f"site policy refuses the plan: {parameter}={value} {floor}")


@dataclass(frozen=True)
class SitePolicy:
    """What this site accepts from a server (see the module docstring for the node config keys)."""

    sites: int | None = None  # the federation's size as this site knows it (None: unknown)
    honest_majority: bool = True  # threshold > sites / 2
    min_threshold: int = 2
    min_modulus_bits: int = DEFAULT_MIN_MODULUS_BITS
    dp_epsilon: float | None = None  # set: the site releases statistics only with DP noise
    dp_delta: float = DEFAULT_DELTA
    max_token_bound: float | None = None
    budget_rho: float | None = None  # explicit lifetime zCDP budget of the site's data
    ledger: Path | None = None  # where the ledger lives (None: the default under the site's cache)

    def __post_init__(self) -> None:
        if self.sites is not None and self.sites < 1:
            raise ValueError(f"node config: the number of sites must be >= 1, got {self.sites}")
        if self.min_threshold < 2 or self.min_modulus_bits < 2:
            raise ValueError("node config: secagg-min-threshold and secagg-min-modulus-bits must be >= 2")
        if self.dp_epsilon is not None and not self.dp_epsilon > 0:
            raise ValueError(f"node config: dp-max-epsilon must be > 0, got {self.dp_epsilon}")
        if not 0 < self.dp_delta < 1:
            raise ValueError(f"node config: dp-delta must be in (0, 1), got {self.dp_delta}")
        if self.budget_rho is not None and not (self.budget_rho >= 0 and math.isfinite(self.budget_rho)):
            raise ValueError(f"node config: dp-budget-rho must be finite and >= 0, got {self.budget_rho}")

    @classmethod
    def from_node_config(cls, node: Mapping) -> SitePolicy:
        """The policy of a site's node config (missing keys: the defaults)."""
        sites = _optional(node, "secagg-sites", int)
        ledger = _optional(node, "dp-ledger", str)
        values = dict(
            sites=sites if sites is not None else _optional(node, "num-partitions", int),
            honest_majority=_optional(node, "secagg-honest-majority", bool),
            min_threshold=_optional(node, "secagg-min-threshold", int),
            min_modulus_bits=_optional(node, "secagg-min-modulus-bits", int),
            dp_epsilon=_optional(node, "dp-max-epsilon", float),
            dp_delta=_optional(node, "dp-delta", float),
            max_token_bound=_optional(node, "dp-max-token-bound", float),
            budget_rho=_optional(node, "dp-budget-rho", float),
            ledger=Path(ledger).expanduser() if ledger else None,
        )
        return cls(**{k: v for k, v in values.items() if v is not None})

    @property
    def requires_dp(self) -> bool:
        """The site releases statistics only with DP noise (``dp-max-epsilon`` is set)."""
        return self.dp_epsilon is not None

    @property
    def budget(self) -> float | None:
        """The lifetime zCDP budget of the site's data (None: unlimited, the ledger only records)."""
        if self.budget_rho is not None:
            return self.budget_rho
        return None if self.dp_epsilon is None else epsilon_to_rho(self.dp_epsilon, self.dp_delta)

    def known_sites(self, plan: SecurePlan) -> int:
        """The federation's size: this site's own, else the plan's ``max_sites``."""
        return self.sites if self.sites is not None else plan.max_sites

    def check_plan(self, plan: SecurePlan) -> None:
        """Refuse (:class:`PolicyError`) a plan that misses a floor of the secure sum or of DP."""
        n = self.known_sites(plan)
        if self.sites is not None and plan.max_sites != self.sites:
            _refuse("max_sites", plan.max_sites, f"but this site knows {self.sites} sites")
        if not plan.threshold <= plan.max_sites:
            _refuse("threshold", plan.threshold, f"exceeds max_sites={plan.max_sites}")
        if self.honest_majority and not 2 * plan.threshold > n:
            _refuse("threshold", plan.threshold, f"must be > {n}/2 (more than half of the {n} sites)")
        if plan.threshold < self.min_threshold:
            _refuse("threshold", plan.threshold, f"below secagg-min-threshold={self.min_threshold}")
        if plan.modulus_bits < self.min_modulus_bits:
            _refuse("modulus_bits", plan.modulus_bits, f"below the floor {self.min_modulus_bits}")
        if self.requires_dp and not plan.dp_sigma > 0:
            _refuse(
                "dp_sigma", plan.dp_sigma, f"but this site requires DP (dp-max-epsilon={self.dp_epsilon})"
            )
        if self.max_token_bound is not None and plan.token_bound > self.max_token_bound:
            _refuse("token_bound", plan.token_bound, f"above dp-max-token-bound={self.max_token_bound}")
        if plan.dp_sigma > 0 and not math.isfinite(plan.dp_sigma):
            _refuse("dp_sigma", plan.dp_sigma, "is not finite")

    def check_neighbours(self, plan: SecurePlan, neighbours: int) -> None:
        """Refuse key routing that names more neighbours than the federation has other sites."""
        n = self.known_sites(plan)
        if neighbours > n - 1:
            _refuse("neighbours", neighbours, f"but this site knows {n} sites (at most {n - 1} neighbours)")

    def check_sigma(self, plan: SecurePlan, sensitivity: float, releases: int) -> None:
        """Refuse a DP release whose noise is below :func:`min_sigma` of this site's (epsilon, delta)."""
        if self.dp_epsilon is None:
            return
        floor = min_sigma(self.dp_epsilon, self.dp_delta, sensitivity, releases)
        if plan.dp_sigma < floor * (1.0 - 1e-9):  # the server's calibration may round differently
            _refuse(
                "dp_sigma",
                f"{plan.dp_sigma:.6g}",
                f"below the floor {floor:.6g} of dp-max-epsilon={self.dp_epsilon}, dp-delta={self.dp_delta} "
                f"over {releases} releases",
            )


def min_sigma(epsilon: float, delta: float, sensitivity: float, releases: int) -> float:
    """The noise std of the sum that makes ``releases`` releases of L2 ``sensitivity`` (epsilon, delta)-DP
    (the server's calibration, ``dp.calibrate_sigma``)."""
    return calibrate_sigma(epsilon, delta, sensitivity, releases)


def release_sensitivity(plan: SecurePlan, seq_len: int, slots: int, kind: str) -> float:
    """L2 sensitivity of one release of ``slots`` statistics of ``kind`` to replacing one window, from
    public fields this site can check (its own ``seq_len`` and what it releases, the plan's clip)."""
    return window_sensitivity(seq_len, plan.token_bound, slots, kind)


def release_rho(plan: SecurePlan, sensitivity: float) -> float:
    """The zCDP ``rho`` of one release with the plan's noise std of the sum (``dp.gaussian_rho``)."""
    return gaussian_rho(sensitivity, plan.dp_sigma)
