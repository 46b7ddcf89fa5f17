"""Accuracy (hand-checked) and plain local SGD for the FedAvg baselines."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from fedprune.hidenseek.models import build_model, prunable_weights
from fedprune.hidenseek.train import accuracy, local_sgd, minibatch_indices


def test_accuracy_by_hand():
    model = nn.Sequential(nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))  # predicts argmax of the input
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    y = torch.tensor([0, 0, 0])
    assert accuracy(model, x, y) == 2 / 3
    assert accuracy(model, x, y, batch_size=1) == 2 / 3
    assert model.training  # mode restored


def test_minibatches_cover_each_index_once():
    batches = minibatch_indices(10, 4, torch.Generator().manual_seed(0))
    assert [b.numel() for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))


def test_local_sgd_lowers_loss_keeps_mask_and_input():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(32, 64, generator=generator)
    y = torch.randint(0, 10, (32,), generator=generator)
    model = build_model("mlp", seed=0, hidden=16)
    original = copy.deepcopy(model.state_dict())
    trained = local_sgd(model, x, y, epochs=5, lr=0.1, batch_size=8, seed=0)
    assert F.cross_entropy(trained(x), y) < F.cross_entropy(model(x), y)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items())
    masks = {n: torch.rand(w.shape, generator=generator) > 0.5 for n, w in prunable_weights(model).items()}
    pruned = local_sgd(model, x, y, epochs=2, lr=0.1, batch_size=8, seed=0, momentum=0.9, masks=masks)
    assert all(float(w.detach()[~masks[n]].abs().sum()) == 0 for n, w in prunable_weights(pruned).items())
    assert all(bool((w[masks[n]] != 0).all()) for n, w in prunable_weights(pruned).items())
