"""Checks of each site's statistics in the clear (``privacy=none``) before they enter a sum.

Always: what no data can give (the kinds' :meth:`~fedprune.stat_kinds.StatKind.site_reason`, e.g. a
negative diagonal of a Gram sum), beyond what :func:`fedprune.payload.decode_stats` refuses (shapes,
NaN/Inf, negative Σx², counts; a Gram sum travels as its upper triangle, so it is symmetric). With
``federation.robust=true`` also: every Gram sum positive semi-definite, and per layer each site's size
per token (Σ‖x‖²/count) within ``robust_scale`` times, and above 1/``robust_scale`` of, the median
site's (with at least :data:`MIN_MEDIAN_SITES` sites; the median holds while fewer than half the sites
are off). A site that fails is rejected for that sum, with the reason and the layer, like a malformed
reply.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

from fedprune.payload import PayloadError
from fedprune.stat_kinds import get_stat_kind
from fedprune.stats import Stats, as_block_stats

logger = logging.getLogger(__name__)

MIN_MEDIAN_SITES = 3  # the median of two sites is their mean: no majority to compare against
DEFAULT_SCALE = 10.0  # federation.robust_scale


class ImplausibleStats(PayloadError):
    """Well-formed statistics that no honest site sends; the message names the layer and why."""

    label = "implausible statistics"


def site_reason(stats: Mapping[str, Stats], psd: bool = False) -> str | None:
    """Why one site's decoded statistics cannot be honest, naming the layer (``None``: plausible);
    ``psd``: also require positive semi-definite Gram sums (``federation.robust``)."""
    block = as_block_stats(stats)
    for group, entry in zip(block.groups, block.group_stats, strict=True):
        kind = get_stat_kind(entry.kind)
        reason = kind.site_reason(entry.total, entry.count)
        if reason is None and psd:
            reason = kind.psd_reason(entry.total)
        if reason is not None:
            return f"{', '.join(group)}: {reason}"
    return None


def scale_outliers(sites: Mapping[int, Mapping[str, Stats]], ratio: float) -> dict[int, str]:
    """Per site, why its size per token is off the median site's by more than ``ratio`` (either way) in
    some layer: the first such layer, and how many more. Sites within ``ratio`` everywhere are absent."""
    names = list(next(iter(sites.values()))) if sites else []
    off: dict[int, list[str]] = {}
    for name in names:
        scales = {
            node: get_stat_kind(s[name].kind).token_scale(s[name].total, s[name].count)
            for node, s in sites.items()
        }
        median = statistics.median(scales.values())
        for node, scale in scales.items():
            if scale > ratio * median or scale * ratio < median:
                off.setdefault(node, []).append(
                    f"{name}: size per token {scale:.3g} vs the median site's {median:.3g} "
                    f"(outside x{ratio:g} either way)"
                )
    return {node: _first_of(reasons) for node, reasons in off.items()}


def _first_of(reasons: list[str]) -> str:
    more = len(reasons) - 1
    return reasons[0] + (f" (and {more} more layer{'s' * (more > 1)})" if more else "")


@dataclass
class SiteChecks:
    """A run's checks of site statistics in the clear (``robust``: ``federation.robust``; ``scale``:
    ``federation.robust_scale``). One object per run: it logs once that a sum skipped the median check."""

    robust: bool = False
    scale: float = DEFAULT_SCALE
    _skip_logged: bool = False

    def check(self, stats: Mapping[str, Stats]) -> None:
        """Raise :class:`ImplausibleStats` if one site's statistics fail the per-site checks."""
        if (reason := site_reason(stats, psd=self.robust)) is not None:
            raise ImplausibleStats(reason)

    def screen(self, sites: Mapping[int, Mapping[str, Stats]]) -> dict[int, str]:
        """The sites to leave out of a sum of all ``sites``' statistics (each passed :meth:`check`), and
        why: the median check, with ``robust`` and enough sites (else logged as skipped)."""
        if not self.robust:
            return {}
        if len(sites) < MIN_MEDIAN_SITES:
            if not self._skip_logged:
                logger.warning(
                    "federation.robust: a sum of %d site(s) skips the scale check against the median site "
                    "(it needs >= %d); logged once, for this and any later such sum",
                    len(sites),
                    MIN_MEDIAN_SITES,
                )
                self._skip_logged = True
            return {}
        return {
            node: f"{ImplausibleStats.label}: {reason}"
            for node, reason in scale_outliers(sites, self.scale).items()
        }
