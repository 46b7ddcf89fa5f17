import pytest
import torch

from fedprune.masks import (
    Pattern,
    pack_bits,
    parse_pattern,
    select_nm,
    select_unstructured,
    sparsity_of,
    unpack_bits,
)

SCORES = torch.tensor(
    [
        [4.0, 1.0, 3.0, 2.0],
        [0.5, 8.0, 7.0, 6.0],
    ]
)


def test_layer_group_prunes_global_lowest():
    keep = select_unstructured(SCORES, 0.5, "layer")
    # four lowest of all eight: 0.5, 1, 2, 3
    expected = torch.tensor([[True, False, False, False], [False, True, True, True]])
    assert torch.equal(keep, expected)


def test_row_group_prunes_lowest_per_row():
    keep = select_unstructured(SCORES, 0.5, "row")
    expected = torch.tensor([[True, False, True, False], [False, True, True, False]])
    assert torch.equal(keep, expected)


def test_column_group_prunes_lowest_per_column():
    keep = select_unstructured(SCORES, 0.5, "column")
    expected = torch.tensor([[True, False, False, False], [False, True, True, True]])
    assert torch.equal(keep, expected)


def test_ties_prune_lower_index_first():
    keep = select_unstructured(torch.ones(1, 4), 0.5, "row")
    assert torch.equal(keep, torch.tensor([[False, False, True, True]]))


def test_zero_sparsity_keeps_everything():
    assert bool(select_unstructured(SCORES, 0.0, "layer").all())


def test_two_four_keeps_two_largest_per_group():
    scores = torch.tensor([[1.0, 4.0, 3.0, 2.0, 9.0, 0.0, 0.0, 8.0]])
    keep = select_nm(scores, 2, 4)
    assert torch.equal(keep, torch.tensor([[False, True, True, False, True, False, False, True]]))


def test_nm_rejects_indivisible_width():
    with pytest.raises(ValueError, match="divisible"):
        select_nm(torch.ones(2, 6), 2, 4)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_sparsity_outside_range_rejected(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        select_unstructured(SCORES, bad, "layer")


def test_parse_pattern():
    assert parse_pattern("unstructured") == Pattern("unstructured")
    assert parse_pattern("2:4") == Pattern("nm", 2, 4)
    assert parse_pattern("4:8").sparsity == 0.5
    for bad in ("4:4", "5:4", "0:4", "2-4", "dense"):
        with pytest.raises(ValueError):
            parse_pattern(bad)


def test_pack_bits_hand_checked_and_round_trip():
    mask = torch.tensor([True, False, True, True, False, False, False, True, True, False])
    packed = pack_bits(mask)
    assert packed.tolist() == [0b10110001, 0b10000000]
    assert torch.equal(unpack_bits(packed, (10,)), mask)
    big = torch.rand(37, 13) > 0.3
    assert torch.equal(unpack_bits(pack_bits(big), (37, 13)), big)


def test_unpack_rejects_wrong_length():
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), (10,))


def test_sparsity_of():
    assert sparsity_of(torch.tensor([True, False, False, False])) == pytest.approx(0.75)


def _sorted_reference(scores: torch.Tensor, num_pruned: int) -> torch.Tensor:
    """Keep-mask per row by a Python sort of (score, index): lowest first, ties by lower index, NaN last."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    for r, row in enumerate(scores.tolist()):
        order = sorted(range(len(row)), key=lambda j: (row[j] != row[j], row[j], j))
        keep[r, order[:num_pruned]] = False
    return keep


@pytest.mark.parametrize("kind", ["continuous", "ties", "nan"])
def test_row_masks_match_a_sort_of_scores_and_indices(kind):
    gen = torch.Generator().manual_seed(3)
    scores = torch.rand(40, 24, generator=gen, dtype=torch.float64)
    if kind == "ties":  # few distinct values: ties at the threshold in most rows
        scores = torch.randint(0, 4, (40, 24), generator=gen).double()
    if kind == "nan":
        scores[::3, ::5] = float("nan")
    for sparsity in (0.25, 0.5, 0.75):
        keep = select_unstructured(scores, sparsity, "row")
        assert torch.equal(keep, _sorted_reference(scores, int(24 * sparsity))), (kind, sparsity)


@pytest.mark.parametrize("kind", ["continuous", "ties", "nan"])
def test_nm_and_column_masks_match_a_sort_of_scores_and_indices(kind):
    gen = torch.Generator().manual_seed(5)
    scores = torch.rand(12, 32, generator=gen, dtype=torch.float64)
    if kind == "ties":  # few distinct values: most groups of 4 hold a tie
        scores = torch.randint(0, 3, (12, 32), generator=gen).double()
    if kind == "nan":
        scores[::2, ::3] = float("nan")
    groups = scores.reshape(-1, 4)  # every 4 consecutive inputs of a row, one group per line
    assert torch.equal(select_nm(scores, 2, 4), _sorted_reference(groups, 2).reshape(12, 32)), kind
    column = _sorted_reference(scores.T.contiguous(), 6).T
    assert torch.equal(select_unstructured(scores, 0.5, "column"), column), kind
