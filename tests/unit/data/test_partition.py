"""Document-wise (non-IID) and IID partitions: coverage, disjointness, balance, determinism."""

from __future__ import annotations

import pytest
import torch

from fedprune.data.partition import partition_by_document, partition_iid

NAMES = ["lear", "othello", "sonnets", "john", "pericles", "cymbeline", "coriolanus"]


def test_partition_by_document_covers_disjoint_balanced():
    parts = partition_by_document(NAMES, num_partitions=3, seed=0)
    assert len(parts) == 3
    flat = [name for part in parts for name in part]
    assert sorted(flat) == sorted(NAMES)  # every work exactly once
    assert sorted(len(part) for part in parts) == [2, 2, 3]
    assert all(part == sorted(part) for part in parts)


def test_partition_by_document_deterministic_and_seed_dependent():
    first = partition_by_document(NAMES, 3, seed=5)
    assert first == partition_by_document(list(reversed(NAMES)), 3, seed=5)
    others = [partition_by_document(NAMES, 3, seed=s) for s in range(6, 12)]
    assert any(other != first for other in others)


def test_partition_by_document_one_work_each():
    parts = partition_by_document(NAMES, num_partitions=len(NAMES), seed=1)
    assert sorted(part[0] for part in parts) == sorted(NAMES)
    assert all(len(part) == 1 for part in parts)


def test_partition_by_document_errors():
    with pytest.raises(ValueError, match="at least one document"):
        partition_by_document(["a", "b"], 3, seed=0)
    with pytest.raises(ValueError, match="unique"):
        partition_by_document(["a", "a", "b"], 2, seed=0)
    with pytest.raises(ValueError):
        partition_by_document(["a"], 0, seed=0)


def test_partition_iid_covers_disjoint_near_equal():
    parts = partition_iid(num_windows=10, num_partitions=3, seed=0)
    assert [part.numel() for part in parts] == [4, 3, 3]
    assert all(part.dtype == torch.int64 for part in parts)
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(10))


def test_partition_iid_deterministic_and_shuffled():
    first = partition_iid(12, 2, seed=3)
    again = partition_iid(12, 2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(torch.cat(first), torch.arange(12))  # shuffled, not contiguous


def test_partition_iid_errors():
    with pytest.raises(ValueError, match="non-empty"):
        partition_iid(2, 3, seed=0)
    with pytest.raises(ValueError):
        partition_iid(5, 0, seed=0)
