import pytest
import torch

from fedprune.aggregation.mask_vote import (
    apply_vote,
    counts_from_packed,
    select_by_votes,
    vote_counts,
)
from fedprune.masks import Pattern, pack_bits

UNSTRUCTURED = Pattern("unstructured")

COUNTS = torch.tensor([[3, 0, 2, 1], [1, 3, 3, 0]], dtype=torch.int32)


def test_counts_from_masks_and_packed():
    a = torch.tensor([[True, False], [True, True]])
    b = torch.tensor([[True, True], [False, True]])
    assert vote_counts([a, b]).tolist() == [[2, 1], [1, 2]]
    assert counts_from_packed([pack_bits(a), pack_bits(b)], (2, 2)).tolist() == [[2, 1], [1, 2]]


def test_layer_row_column_selection_hand_checked():
    layer = select_by_votes(COUNTS, 0.5, UNSTRUCTURED, "layer", seed=0)
    # four highest of [3,0,2,1,1,3,3,0]: the three 3s and the 2
    assert layer.tolist() == [[True, False, True, False], [False, True, True, False]]
    row = select_by_votes(COUNTS, 0.5, UNSTRUCTURED, "row", seed=0)
    assert row.tolist() == [[True, False, True, False], [False, True, True, False]]
    column = select_by_votes(COUNTS, 0.5, UNSTRUCTURED, "column", seed=0)
    # per column keep the larger: col0 3>1, col1 3>0, col2 3>2, col3 1>0
    assert column.tolist() == [[True, False, False, True], [False, True, True, False]]


def test_ties_broken_deterministically_by_seed():
    counts = torch.ones(4, 8, dtype=torch.int32)
    a = select_by_votes(counts, 0.5, UNSTRUCTURED, "row", seed=1)
    b = select_by_votes(counts, 0.5, UNSTRUCTURED, "row", seed=1)
    c = select_by_votes(counts, 0.5, UNSTRUCTURED, "row", seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.sum().item() == 16


def test_ties_never_override_majority():
    counts = torch.tensor([[2, 1, 1, 1]], dtype=torch.int32)
    for seed in range(20):
        keep = select_by_votes(counts, 0.75, UNSTRUCTURED, "row", seed=seed)
        assert keep.tolist() == [[True, False, False, False]]


def test_nm_valid_after_aggregation():
    counts = torch.tensor([[3, 3, 3, 0, 1, 2, 2, 2]], dtype=torch.int32)
    keep = select_by_votes(counts, 0.0, Pattern("nm", 2, 4), "row", seed=0)
    assert keep.reshape(1, 2, 4).sum(-1).tolist() == [[2, 2]]
    assert keep[0, 3].item() is False and keep[0, 4].item() is False


def test_weight_scaling():
    w = torch.tensor([[2.0, 4.0], [6.0, 8.0]])
    keep = torch.tensor([[True, False], [True, True]])
    counts = torch.tensor([[4, 1], [2, 4]], dtype=torch.int32)
    assert apply_vote(w, keep, counts, 4, scaling=False).tolist() == [[2.0, 0.0], [6.0, 8.0]]
    assert apply_vote(w, keep, counts, 4, scaling=True).tolist() == [[2.0, 0.0], [3.0, 8.0]]


def test_mismatched_masks_rejected():
    with pytest.raises(ValueError):
        vote_counts([torch.ones(2, 2, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool)])
    with pytest.raises(ValueError):
        vote_counts([])
