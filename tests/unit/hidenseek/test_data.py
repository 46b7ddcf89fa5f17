"""Bundled digits: shapes and range, held-out split, Dirichlet label partition."""

from __future__ import annotations

import pytest
import torch

from fedprune.hidenseek.data import (
    dirichlet_label_partition,
    label_histogram,
    load_digits_split,
    load_digits_tensors,
    split_indices,
)


def test_digits_tensors():
    x, y = load_digits_tensors()
    assert x.shape == (1797, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert sorted(y.unique().tolist()) == list(range(10))


def test_split_is_disjoint_complete_seeded():
    train, test = split_indices(10, 0.2, seed=0)
    assert test.numel() == 2 and train.numel() == 8
    assert sorted(torch.cat([train, test]).tolist()) == list(range(10))
    assert torch.equal(split_indices(10, 0.2, seed=0)[1], test)
    split = load_digits_split(0.2, seed=0)
    assert split.x_test.shape == (359, 64) and split.x_train.shape == (1438, 64)  # round(.2 * 1797) = 359
    with pytest.raises(ValueError):
        split_indices(10, 1.0, seed=0)


def _max_class_share(labels: torch.Tensor, parts: list[torch.Tensor]) -> float:
    """Mean over clients of the share of their most frequent class."""
    shares = [label_histogram(labels[p]).max().item() / p.numel() for p in parts]
    return sum(shares) / len(shares)


def test_dirichlet_partition_covers_once_min_size_deterministic():
    _, y = load_digits_tensors()
    parts = dirichlet_label_partition(y, num_clients=5, alpha=0.3, seed=0, min_size=20)
    flat = torch.cat(parts)
    assert flat.numel() == y.numel() and torch.equal(flat.sort().values, torch.arange(y.numel()))
    assert min(p.numel() for p in parts) >= 20
    assert all(
        torch.equal(p, q) for p, q in zip(parts, dirichlet_label_partition(y, 5, 0.3, 0, 20), strict=True)
    )
    other = dirichlet_label_partition(y, 5, 0.3, seed=1, min_size=20)
    assert any(not torch.equal(p, q) for p, q in zip(parts, other, strict=True))


def test_dirichlet_partition_skew_grows_as_alpha_shrinks():
    _, y = load_digits_tensors()
    skewed = _max_class_share(y, dirichlet_label_partition(y, 5, alpha=0.05, seed=0, min_size=10))
    iid = _max_class_share(y, dirichlet_label_partition(y, 5, alpha=1000.0, seed=0, min_size=10))
    assert iid < 0.15  # near the balanced 0.1
    assert skewed > 0.5  # most of each client's data is one class


def test_dirichlet_partition_errors():
    labels = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="cannot give"):
        dirichlet_label_partition(labels, 3, 1.0, seed=0, min_size=2)
    with pytest.raises(ValueError):
        dirichlet_label_partition(labels, 2, 0.0, seed=0)
