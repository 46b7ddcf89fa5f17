"""Splitting calibration data among federated clients (pure functions, no I/O).

Two schemes, used at different stages, hence two signatures (no common registry):

* :func:`partition_by_document` splits *work names* before tokenization: each client then
  tokenizes and samples calibration windows from its own works only (non-IID: each client sees
  different plays).
* :func:`partition_iid` splits the *indices of a pooled window tensor*: the caller samples windows
  once from all calibration works and gives client ``i`` the rows ``windows[parts[i]]`` (IID).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)


def partition_by_document(
    doc_names: Sequence[str], num_partitions: int, seed: int
) -> list[list[str]]:
    """Deal whole documents to partitions after a seeded shuffle.

    The names are sorted, shuffled with a local generator seeded with ``seed`` and dealt
    round-robin, so partition sizes differ by at most one and every partition gets at least one
    document.

    Returns
    -------
    list[list[str]]
        ``num_partitions`` lists of names, each sorted; together they hold every name exactly once.

    Raises
    ------
    ValueError
        If ``num_partitions < 1``, names repeat, or there are fewer documents than partitions.
    """
    if num_partitions < 1:
        raise ValueError(f"need num_partitions >= 1, got {num_partitions}")
    names = sorted(doc_names)
    if len(set(names)) != len(names):
        raise ValueError("document names must be unique")
    if len(names) < num_partitions:
        raise ValueError(
            f"cannot deal {len(names)} documents to {num_partitions} partitions: "
            "each partition needs at least one document"
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(names), generator=generator).tolist()
    shuffled = [names[i] for i in order]
    return [sorted(shuffled[p::num_partitions]) for p in range(num_partitions)]


def partition_iid(num_windows: int, num_partitions: int, seed: int) -> list[torch.Tensor]:
    """Random split of window indices ``0 .. num_windows - 1`` into near-equal parts.

    Returns
    -------
    list[torch.Tensor]
        ``num_partitions`` int64 index tensors ``(part_size,)``, sizes differing by at most one,
        disjoint and together covering every index once.

    Raises
    ------
    ValueError
        If ``num_partitions < 1`` or there are fewer windows than partitions.
    """
    if num_partitions < 1:
        raise ValueError(f"need num_partitions >= 1, got {num_partitions}")
    if num_windows < num_partitions:
        raise ValueError(
            f"cannot split {num_windows} windows into {num_partitions} non-empty partitions"
        )
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(num_windows, generator=generator)  # (num_windows,)
    return [part.clone() for part in torch.tensor_split(permutation, num_partitions)]
