"""Each site's private calibration windows, from a partitioner registry.

Every partitioner has one signature: from the calibration documents, a site's id and the number of sites,
the site's windows. The total number of windows is split evenly over sites (the first ``total % sites``
sites get one more), so a federation calibrates on as many windows as the centralized run it is compared
with, and :func:`pooled_windows` (all sites' windows stacked) is that centralized reference.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch

from fedprune.data.partition import partition_by_document, partition_iid
from fedprune.data.windows import sample_windows

logger = logging.getLogger(__name__)

SitePartitioner = Callable[[Mapping[str, torch.Tensor], int, int, int, int, int], torch.Tensor]


def site_window_count(total_windows: int, site: int, num_sites: int) -> int:
    """Windows of one site when ``total_windows`` are split evenly over ``num_sites``."""
    if total_windows < num_sites:
        raise ValueError(f"{total_windows} calibration windows cannot be split over {num_sites} sites")
    return total_windows // num_sites + (1 if site < total_windows % num_sites else 0)


def _check_site(site: int, num_sites: int) -> None:
    if not 0 <= site < num_sites:
        raise ValueError(f"site id {site} outside [0, {num_sites})")


def by_document_windows(
    docs: Mapping[str, torch.Tensor], site: int, num_sites: int, total_windows: int, seq_len: int, seed: int
) -> torch.Tensor:
    """Whole works dealt to sites (non-IID); a site samples its windows from its own works only."""
    _check_site(site, num_sites)
    names = partition_by_document(list(docs), num_sites, seed)[site]
    count = site_window_count(total_windows, site, num_sites)
    return sample_windows({n: docs[n] for n in names}, count, seq_len, seed * 1000 + site + 1)


def iid_windows(
    docs: Mapping[str, torch.Tensor], site: int, num_sites: int, total_windows: int, seq_len: int, seed: int
) -> torch.Tensor:
    """Windows sampled once from all works, then split at random among sites (IID)."""
    _check_site(site, num_sites)
    pooled = sample_windows(docs, total_windows, seq_len, seed)
    return pooled[partition_iid(total_windows, num_sites, seed)[site]]


SITE_PARTITIONERS: dict[str, SitePartitioner] = {
    "by_document": by_document_windows,
    "iid": iid_windows,
}


def site_windows(
    partitioner: str,
    docs: Mapping[str, torch.Tensor],
    site: int,
    num_sites: int,
    total_windows: int,
    seq_len: int,
    seed: int,
) -> torch.Tensor:
    """``(windows, seq_len)`` calibration ids of one site."""
    if partitioner not in SITE_PARTITIONERS:
        raise KeyError(f"unknown partitioner {partitioner!r}; known: {sorted(SITE_PARTITIONERS)}")
    return SITE_PARTITIONERS[partitioner](docs, site, num_sites, total_windows, seq_len, seed)


def pooled_windows(
    partitioner: str,
    docs: Mapping[str, torch.Tensor],
    num_sites: int,
    total_windows: int,
    seq_len: int,
    seed: int,
) -> torch.Tensor:
    """All sites' windows stacked in site order: the centralized reference calibration set."""
    return torch.cat(
        [
            site_windows(partitioner, docs, s, num_sites, total_windows, seq_len, seed)
            for s in range(num_sites)
        ]
    )
