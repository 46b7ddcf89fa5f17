"""SynFlow scores (hand-checked), schedule, exact global density, nesting, layer collapse; baselines."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedprune.hidenseek.baseline_masks import magnitude_masks_at_init, random_masks
from fedprune.hidenseek.models import build_model, prunable_weights
from fedprune.hidenseek.selection import global_top_k_masks, num_kept
from fedprune.hidenseek.synflow import exponential_densities, synflow_masks, synflow_scores

W1 = [[1.0, -2.0], [3.0, 0.5]]  # (hidden=2, in=2)
W2 = [[2.0, -1.5]]  # (out=1, hidden=2)


def two_layer_net(w1=W1, w2=W2, bias: bool = False) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(2, 2, bias=bias), nn.ReLU(), nn.Linear(2, 1, bias=bias))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor(w1))
        net[2].weight.copy_(torch.tensor(w2))
    return net


def all_kept(net: nn.Module) -> dict[str, torch.Tensor]:
    return {name: torch.ones_like(w, dtype=torch.bool) for name, w in prunable_weights(net).items()}


def test_scores_on_hand_set_two_layer_net():
    # Linearised: |W1| = [[1, 2], [3, .5]], |W2| = [[2, 1.5]], input ones.
    # hidden h = |W1| 1 = [3, 3.5]; R = |W2| h = 2*3 + 1.5*3.5 = 11.25.
    # dR/dW2[0, j] = h_j           -> score W2 = [2*3, 1.5*3.5] = [6, 5.25]
    # dR/dW1[j, i] = |W2_j| * 1    -> score W1 = [[2*1, 2*2], [1.5*3, 1.5*.5]] = [[2, 4], [4.5, .75]]
    net = two_layer_net()
    scores = synflow_scores(net, all_kept(net), (2,))
    assert torch.allclose(scores["0.weight"], torch.tensor([[2.0, 4.0], [4.5, 0.75]], dtype=torch.float64))
    assert torch.allclose(scores["2.weight"], torch.tensor([[6.0, 5.25]], dtype=torch.float64))
    # the caller's network is untouched (no abs, no masking, no grads)
    assert torch.equal(net[0].weight, torch.tensor(W1)) and net[0].weight.grad is None


def test_scores_respect_masks():
    # W1 masked to [[0, 2], [3, 0]]: h = [2, 3]; scores W1 = [[0, 2*2], [1.5*3, 0]], W2 = [2*2, 1.5*3].
    net = two_layer_net()
    masks = {
        "0.weight": torch.tensor([[False, True], [True, False]]),
        "2.weight": torch.ones(1, 2, dtype=bool),
    }
    scores = synflow_scores(net, masks, (2,))
    assert torch.allclose(scores["0.weight"], torch.tensor([[0.0, 4.0], [4.5, 0.0]], dtype=torch.float64))
    assert torch.allclose(scores["2.weight"], torch.tensor([[4.0, 4.5]], dtype=torch.float64))


def test_one_shot_and_two_round_masks_by_hand():
    net = two_layer_net()
    # one shot, keep 3 of 6: scores {2, 4, 4.5, .75 | 6, 5.25} -> keep 6, 5.25, 4.5
    one_shot = synflow_masks(net, 0.5, iterations=1, input_shape=(2,))
    assert torch.equal(one_shot["0.weight"], torch.tensor([[False, False], [True, False]]))
    assert torch.equal(one_shot["2.weight"], torch.tensor([[True, True]]))
    # two rounds: densities [.7071, .5]; round 1 keeps round(4.24) = 4 (drops .75 and 2);
    # round 2 rescored as in test_scores_respect_masks -> {4, 4.5 | 4, 4.5}, keep 3: the tie at 4 drops
    # the first in concatenation order, W1[0, 1].
    two = synflow_masks(net, 0.5, iterations=2, input_shape=(2,))
    assert torch.equal(two["0.weight"], torch.tensor([[False, False], [True, False]]))
    assert torch.equal(two["2.weight"], torch.tensor([[True, True]]))


def test_conservation_per_layer_on_random_mlp_and_cnn():
    # R is positively 1-homogeneous in each layer's weights (ReLU, max-pool, no bias), so by Euler's
    # theorem the scores of every layer sum to R = sum(output of the linearised net).
    for arch in ("mlp", "cnn"):
        model = build_model(arch, seed=3, hidden=16, channels=(4, 8))
        scores = synflow_scores(model, all_kept(model), (64,))
        sums = torch.stack([s.sum() for s in scores.values()])
        assert torch.allclose(sums, sums[0].expand_as(sums), rtol=1e-9)
        assert float(sums[0]) > 0


def test_exponential_schedule():
    assert exponential_densities(0.25, 2) == pytest.approx([0.5, 0.25])
    schedule = exponential_densities(0.1, 5)
    assert schedule == pytest.approx([0.1 ** (k / 5) for k in range(1, 6)])
    assert all(a > b for a, b in zip(schedule, schedule[1:], strict=False)) and schedule[-1] == pytest.approx(
        0.1
    )
    with pytest.raises(ValueError):
        exponential_densities(0.5, 0)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_global_density_exactly_hit(arch):
    model = build_model(arch, seed=0, hidden=16, channels=(4, 8))
    total = sum(w.numel() for w in prunable_weights(model).values())
    for masks in (
        synflow_masks(model, 0.3, iterations=10),
        magnitude_masks_at_init(model, 0.3),
        random_masks(model, 0.3, seed=1),
    ):
        assert set(masks) == set(prunable_weights(model))
        assert sum(int(m.sum()) for m in masks.values()) == round(0.3 * total)
        assert all(
            m.dtype == torch.bool and m.shape == prunable_weights(model)[n].shape for n, m in masks.items()
        )


def test_synflow_biases_not_pruned_and_only_weights_masked():
    model = build_model("mlp", seed=0, hidden=8, bias=True)
    masks = synflow_masks(model, 0.5, iterations=3)
    assert sorted(masks) == ["layers.0.weight", "layers.2.weight", "layers.4.weight"]


def test_iterative_synflow_avoids_layer_collapse_that_magnitude_and_one_shot_suffer():
    # Layer 1: 16 weights of .01; layer 2: 4 weights of 1. Density .2 keeps 4 weights. Magnitude keeps
    # the 4 large ones, so layer 1 is empty. One-shot SynFlow too: scores are .01 (layer 1) vs .04.
    net = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        net[0].weight.fill_(0.01)
        net[2].weight.fill_(1.0)
    for collapsed in (magnitude_masks_at_init(net, 0.2), synflow_masks(net, 0.2, 1, (4,))):
        assert not bool(collapsed["0.weight"].any())
    masks = synflow_masks(net, 0.2, iterations=100, input_shape=(4,))
    assert all(bool(m.any()) for m in masks.values())
    # a connected path survives: the masked linearised net still passes flow (scores > 0)
    assert float(synflow_scores(net, masks, (4,))["2.weight"].sum()) > 0


def test_synflow_masks_are_nested_across_densities_of_one_schedule():
    # fewer rounds of the same schedule shape: the density-.5 masks of 2 rounds sit inside round 1's
    model = build_model("mlp", seed=1, hidden=16)
    coarse = synflow_masks(model, math.sqrt(0.5), iterations=1)
    fine = synflow_masks(model, 0.5, iterations=2)
    assert all(bool((fine[n] <= coarse[n]).all()) for n in fine)


def test_global_top_k_ties_and_previous():
    scores = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([[3.0], [0.5]])}
    masks = global_top_k_masks(scores, keep=2)
    assert masks["a"].tolist() == [False, True] and masks["b"].tolist() == [[True], [False]]
    # tie at 3.0 broken by concatenation order: a[1] (earlier) is dropped first
    one = global_top_k_masks(scores, keep=1)
    assert one["a"].tolist() == [False, False] and one["b"].tolist() == [[True], [False]]
    # an entry pruned before stays pruned even with the top score
    prev = {"a": torch.tensor([True, False]), "b": torch.tensor([[True], [True]])}
    again = global_top_k_masks(scores, keep=2, previous=prev)
    assert again["a"].tolist() == [True, False] and again["b"].tolist() == [[True], [False]]
    assert num_kept(10, 0.25) == 2  # round(2.5) -> banker's rounding to 2
    with pytest.raises(ValueError):
        num_kept(10, 0.0)


def test_magnitude_by_hand_and_random_seeded():
    net = two_layer_net()
    # |w| = {1, 2, 3, .5 | 2, 1.5}; keep 3. Ascending (stable): .5, 1, 1.5, 2 (W1), 2 (W2), 3
    # -> drop .5, 1, 1.5; keep W1[0, 1], W1[1, 0], W2[0, 0]
    masks = magnitude_masks_at_init(net, 0.5)
    assert masks["0.weight"].tolist() == [[False, True], [True, False]]
    assert masks["2.weight"].tolist() == [[True, False]]
    model = build_model("mlp", seed=0, hidden=16)
    first = random_masks(model, 0.5, seed=7)
    assert all(torch.equal(first[n], random_masks(model, 0.5, seed=7)[n]) for n in first)
    assert any(not torch.equal(first[n], random_masks(model, 0.5, seed=8)[n]) for n in first)
