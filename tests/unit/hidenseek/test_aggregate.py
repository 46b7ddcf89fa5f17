"""Majority vote with ties, score averaging, 1-bit sign codec, kept-weight gather/scatter, FedAvg."""

from __future__ import annotations

import pytest
import torch

from fedprune.hidenseek.aggregate import (
    average_scores,
    fedavg,
    gather_kept,
    majority_vote_signs,
    num_kept_weights,
    pack_signs,
    scatter_kept,
    signs_of_scores,
    unpack_signs,
)


def test_majority_vote_with_ties_keeping_current():
    stack = torch.tensor([[1, -1, 1, -1], [1, 1, -1, -1]], dtype=torch.int8)
    current = torch.tensor([-1, -1, 1, 1], dtype=torch.int8)
    # votes: [2, 0, 0, -2] -> [+1, tie keeps -1, tie keeps +1, -1]
    assert majority_vote_signs(stack, current).tolist() == [1, -1, 1, -1]
    three = torch.tensor([[1, -1], [-1, -1], [-1, 1]], dtype=torch.int8)
    result = majority_vote_signs(three, torch.tensor([1, 1], dtype=torch.int8))
    assert result.tolist() == [-1, -1] and result.dtype == torch.int8


def test_majority_vote_rejects_zero_signs():
    with pytest.raises(ValueError, match="-1 or \\+1"):
        majority_vote_signs(torch.tensor([[0, 1]], dtype=torch.int8), torch.tensor([1, 1], dtype=torch.int8))


def test_average_scores_and_signs():
    stack = torch.tensor([[1.0, -2.0, 1.0], [3.0, 4.0, -1.0]])
    # weights 1:3 -> [(1 + 9) / 4, (-2 + 12) / 4, (1 - 3) / 4] = [2.5, 2.5, -.5]
    assert average_scores(stack, [1, 3]).tolist() == pytest.approx([2.5, 2.5, -0.5])
    assert average_scores(stack).tolist() == pytest.approx([2.0, 1.0, 0.0])
    signs = signs_of_scores(average_scores(stack), torch.tensor([-1, -1, -1], dtype=torch.int8))
    assert signs.tolist() == [1, 1, -1]  # exact 0 keeps the current sign
    with pytest.raises(ValueError):
        average_scores(stack, [1.0])


def test_pack_signs_by_hand_and_round_trip():
    signs = torch.tensor([1, -1, 1, 1, -1, -1, -1, -1, 1], dtype=torch.int8)
    packed = pack_signs(signs)
    # bits 1011 0000 | 1000 0000 (big-endian within a byte, padded with 0)
    assert packed.tolist() == [0b10110000, 0b10000000] and packed.dtype == torch.uint8
    assert torch.equal(unpack_signs(packed, 9), signs)
    generator = torch.Generator().manual_seed(0)
    for n in (1, 8, 13, 1000):
        random_signs = (torch.randint(0, 2, (n,), generator=generator) * 2 - 1).to(torch.int8)
        packed = pack_signs(random_signs)
        assert packed.numel() == (n + 7) // 8  # one bit per kept weight
        assert torch.equal(unpack_signs(packed, n), random_signs)


def test_gather_scatter_kept_round_trip():
    masks = {"a": torch.tensor([[True, False], [False, True]]), "b": torch.tensor([False, True, True])}
    tensors = {"a": torch.tensor([[1, 2], [3, 4]]), "b": torch.tensor([5, 6, 7])}
    flat = gather_kept(tensors, masks)
    assert flat.tolist() == [1, 4, 6, 7] and num_kept_weights(masks) == 4
    back = scatter_kept(flat, masks, fill=0)
    assert back["a"].tolist() == [[1, 0], [0, 4]] and back["b"].tolist() == [0, 6, 7]
    with pytest.raises(ValueError):
        scatter_kept(torch.tensor([1, 2]), masks)


def test_fedavg_weighted_by_samples_without_mutating_inputs():
    states = [
        {"w": torch.tensor([0.0, 4.0]), "b": torch.tensor([1.0])},
        {"w": torch.tensor([2.0, 0.0]), "b": torch.tensor([5.0])},
    ]
    average = fedavg(states, [1, 3])
    # w: (1*[0, 4] + 3*[2, 0]) / 4 = [1.5, 1]; b: (1 + 15) / 4 = 4
    assert average["w"].tolist() == pytest.approx([1.5, 1.0]) and average["b"].tolist() == pytest.approx(
        [4.0]
    )
    assert average["w"].dtype == torch.float32
    assert states[0]["w"].tolist() == [0.0, 4.0]
    with pytest.raises(ValueError):
        fedavg(states, [1])
    with pytest.raises(ValueError):
        fedavg(states, [0, 0])
