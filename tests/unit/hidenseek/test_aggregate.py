"""Majority vote with ties, score averaging, 1-bit sign codec, kept-weight gather/scatter, FedAvg."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedprune.hidenseek.aggregate import (
    add_score_delta,
    average_scores,
    decoded_change,
    delta_scale,
    fedavg,
    gather_kept,
    majority_vote_signs,
    num_kept_weights,
    pack_signs,
    pack_top,
    scatter_kept,
    signs_of_scores,
    stochastic_signs,
    top_changes,
    top_count,
    unpack_signs,
    unpack_top,
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


def test_delta_scale_is_a_quantile_of_abs_and_positive():
    delta = torch.tensor([0.1, -0.2, 0.3, -0.4, 0.5])
    assert delta_scale(delta, 1.0) == pytest.approx(0.5)
    assert delta_scale(delta, 0.5) == pytest.approx(0.3)  # median of |delta|
    assert delta_scale(delta, 0.75) == pytest.approx(0.4)
    assert delta_scale(torch.zeros(3), 0.9) > 0  # all-zero change: still a valid scale
    with pytest.raises(ValueError):
        delta_scale(delta, 0.0)


def test_stochastic_signs_clip_and_are_unbiased_inside_the_scale():
    generator = torch.Generator().manual_seed(0)
    # |delta| >= scale: always the sign of delta
    assert stochastic_signs(torch.tensor([2.0, 1.0, -1.0, -3.0]), 1.0, generator).tolist() == [1, 1, -1, -1]
    # delta = 0.5 * scale: +1 with probability 0.75, so scale * mean(signs) ~ delta = 0.5
    signs = stochastic_signs(torch.full((20_000,), 0.5), 1.0, generator)
    assert signs.dtype == torch.int8 and set(signs.tolist()) == {-1, 1}
    assert float(signs.double().mean()) == pytest.approx(0.5, abs=0.03)
    assert float(stochastic_signs(torch.zeros(20_000), 2.0, generator).double().mean()) == pytest.approx(
        0, abs=0.03
    )
    same = [stochastic_signs(torch.full((64,), 0.1), 1.0, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*same)  # a seed fixes the draw
    with pytest.raises(ValueError):
        stochastic_signs(torch.zeros(2), 0.0, generator)


def test_add_score_delta_by_hand():
    scores = torch.tensor([0.1, 0.1])
    signs = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int8)
    # weights 1:3, scales 0.2 and 0.4: [(0.2 - 3 * 0.4) / 4, (-0.2 - 3 * 0.4) / 4] = [-0.25, -0.35]
    new = add_score_delta(scores, signs, [0.2, 0.4], [1, 3], server_lr=1.0)
    assert new.tolist() == pytest.approx([-0.15, -0.25]) and new.dtype == torch.float32
    assert add_score_delta(scores, signs, [0.2, 0.4], [1, 3], server_lr=0.5).tolist() == pytest.approx(
        [-0.025, -0.075]
    )
    with pytest.raises(ValueError):
        add_score_delta(scores, signs, [0.2], [1, 3], server_lr=1.0)


def test_top_changes_pack_and_decode_by_hand():
    delta = torch.tensor([0.05, -2.0, 0.1, 0.5, -0.01])
    assert top_count(5, 0.4) == 2 and top_count(5, 0.0) == 0 and top_count(99, 0.02) == 1
    index, values = top_changes(delta, 2)
    # the two largest |changes| are -2.0 (at 1) and 0.5 (at 3), indices sorted
    assert index.tolist() == [1, 3] and values.dtype == torch.float16 and values.tolist() == [-2.0, 0.5]
    packed = pack_top(index, values)
    assert packed.dtype == np.uint16 and packed.shape == (4,) and packed[:2].tolist() == [1, 3]
    back_index, back_values = unpack_top(packed, 5)
    assert back_index.tolist() == [1, 3] and back_values.tolist() == [-2.0, 0.5]
    # the server's reading: scale * signs, the top changes exact
    signs = torch.tensor([1, -1, -1, 1, 1], dtype=torch.int8)
    assert decoded_change(signs, 0.1, back_index, back_values).tolist() == pytest.approx([0.1, -2.0, -0.1, 0.5, 0.1])
    assert decoded_change(signs, 0.1).tolist() == pytest.approx([0.1, -0.1, -0.1, 0.1, 0.1])
    # two sites, weights 1:3; only site 0 sends a top change (-2.0 at 1): [0.1 + (0.1 - 3 * 0.2) / 4, ...]
    stack = torch.stack([signs[:2], torch.tensor([-1, 1], dtype=torch.int8)])
    top0 = (torch.tensor([1]), torch.tensor([-2.0]))
    new = add_score_delta(torch.tensor([0.1, 0.1]), stack, [0.1, 0.2], [1, 3], 1.0, [top0, None])
    assert new.tolist() == pytest.approx([0.1 + (0.1 - 0.6) / 4, 0.1 + (-2.0 + 0.6) / 4])
    with pytest.raises(ValueError):
        unpack_top(np.array([3, 1, 0, 0], dtype=np.uint16), 5)  # indices not increasing
    with pytest.raises(ValueError):
        unpack_top(np.array([7, 0], dtype=np.uint16), 5)  # index out of range
    with pytest.raises(ValueError):
        unpack_top(np.array([0, 0x7E00], dtype=np.uint16), 5)  # float16 NaN
    with pytest.raises(ValueError):
        top_count(70_000, 0.01)  # uint16 indices
    with pytest.raises(ValueError):
        add_score_delta(torch.tensor([0.1, 0.1]), stack, [0.1, 0.2], [1, 3], 1.0, [top0])
