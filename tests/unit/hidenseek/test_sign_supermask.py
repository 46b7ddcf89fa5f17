"""Straight-through sign / binary gates (hand-checked), supermask layers and models, frozen weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedprune.hidenseek.models import apply_masks_, build_model, prunable_weights
from fedprune.hidenseek.sign_supermask import (
    SupermaskLayer,
    binary_ste,
    learned_codes,
    local_train,
    materialize,
    sign_ste,
    supermask_layers,
    to_binary_supermask,
    to_sign_supermask,
    train_scores,
)
from fedprune.hidenseek.synflow import synflow_masks


def test_sign_ste_forward_and_identity_gradient():
    scores = torch.tensor([-0.5, 0.0, 0.2], requires_grad=True)
    signs = sign_ste(scores)
    assert signs.tolist() == [-1.0, 1.0, 1.0]  # sign(0) = +1
    (torch.tensor([3.0, -2.0, 5.0]) * signs).sum().backward()
    assert scores.grad.tolist() == [3.0, -2.0, 5.0]  # d/dscore = upstream gradient (identity)


def test_sign_ste_clipped_gradient():
    scores = torch.tensor([-0.5, 0.0, 0.2], requires_grad=True)
    (torch.tensor([3.0, -2.0, 5.0]) * sign_ste(scores, clip=0.3)).sum().backward()
    assert scores.grad.tolist() == [0.0, -2.0, 5.0]  # |-.5| > .3 is cut


def test_binary_ste_forward_and_gradient():
    scores = torch.tensor([-0.5, 0.0, 0.2], requires_grad=True)
    gate = binary_ste(scores)
    assert gate.tolist() == [0.0, 1.0, 1.0]
    (torch.tensor([3.0, -2.0, 5.0]) * gate).sum().backward()
    assert scores.grad.tolist() == [3.0, -2.0, 5.0]


def _linear(weight) -> nn.Linear:
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
    return layer


def test_sign_layer_value_and_gradient_by_hand():
    # w = [2, -3], mask = [1, 0], codes = [-1, +1]: effective = [1*-1*2, 0] = [-2, 0]
    layer = SupermaskLayer(_linear([[2.0, -3.0]]), torch.tensor([[True, False]]), torch.tensor([[-1, 1]]))
    assert layer.effective_weight().tolist() == [[-2.0, 0.0]]
    out = layer(torch.tensor([[1.0, 4.0]]))  # -2*1 + 0*4
    assert out.item() == -2.0
    out.sum().backward()
    # d out / d score_j = x_j * mask_j * w_j (STE identity) = [1*1*2, 4*0*-3] = [2, 0]
    assert layer.scores.grad.tolist() == [[2.0, 0.0]]
    assert layer.scores.detach()[0].tolist() == pytest.approx([-0.1, 0.1])  # codes * init_scale


def test_binary_layer_value_by_hand():
    # codes [-1, +1] -> gate [0, 1]; w = [2, -3]; effective [0, -3]; out = -3 * 4
    layer = SupermaskLayer(
        _linear([[2.0, -3.0]]), torch.tensor([[True, True]]), torch.tensor([[-1, 1]]), kind="binary"
    )
    assert layer(torch.tensor([[1.0, 4.0]])).item() == -12.0
    assert layer.codes().tolist() == [[-1, 1]] and layer.codes().dtype == torch.int8


def test_conv_layer_matches_conv2d_with_effective_weight():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel_size=3, padding=1, stride=2, bias=True)
    mask = torch.rand(conv.weight.shape) > 0.5
    codes = torch.where(torch.rand(conv.weight.shape) > 0.5, 1, -1)
    layer = SupermaskLayer(conv, mask, codes)
    x = torch.randn(4, 2, 8, 8)
    expected = F.conv2d(x, mask * codes * conv.weight, conv.bias, stride=2, padding=1)
    assert torch.allclose(layer(x), expected)


def test_sign_model_reproduces_global_model_and_only_scores_train():
    model = build_model("mlp", seed=0, hidden=16)
    masks = synflow_masks(model, 0.5, iterations=5)
    x = torch.rand(7, 64)
    # all +1 codes: exactly the pruned random network
    pruned = apply_masks_(copy.deepcopy(model), masks)
    sign_model = to_sign_supermask(model, masks)
    assert torch.allclose(sign_model(x), pruned(x))
    # arbitrary codes: exactly the network with weights mask * s * w
    generator = torch.Generator().manual_seed(1)
    codes = {
        n: torch.randint(0, 2, w.shape, generator=generator) * 2 - 1
        for n, w in prunable_weights(model).items()
    }
    signed = to_sign_supermask(model, masks, codes)
    manual = copy.deepcopy(model)
    with torch.no_grad():
        for name, weight in prunable_weights(manual).items():
            weight.mul_(masks[name] * codes[name])
    assert torch.allclose(signed(x), manual(x))
    assert torch.allclose(materialize(signed)(x), manual(x))
    assert all(torch.equal(learned_codes(signed)[n], codes[n].to(torch.int8)) for n in codes)
    assert [name.rsplit(".", 1)[1] for name, _ in signed.named_parameters()] == ["scores"] * 3


def test_cnn_binary_model_all_ones_is_pruned_network():
    model = build_model("cnn", seed=0, channels=(4, 8))
    masks = synflow_masks(model, 0.5, iterations=3)
    x = torch.rand(5, 64)
    binary = to_binary_supermask(model, masks)
    pruned = apply_masks_(copy.deepcopy(model), masks)
    assert torch.allclose(binary(x), pruned(x))
    assert torch.allclose(materialize(binary)(x), pruned(x))


def _toy_data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(n, 64, generator=generator)
    y = torch.randint(0, 10, (n,), generator=generator)
    return x, y


def test_local_train_freezes_weights_changes_signs_and_is_deterministic():
    model = build_model("mlp", seed=0, hidden=16)
    masks = synflow_masks(model, 0.5, iterations=5)
    sign_model = to_sign_supermask(model, masks)
    before = copy.deepcopy(sign_model.state_dict())
    x, y = _toy_data()
    trained = train_scores(sign_model, x, y, epochs=3, lr=1.0, batch_size=16, seed=0)
    for key, layer in supermask_layers(trained).items():
        name = key.removesuffix(".weight")
        assert torch.equal(layer.weight, before[f"{name}.weight"])  # weights frozen
        assert torch.equal(layer.prune_mask, before[f"{name}.prune_mask"])
        assert not torch.equal(layer.scores, before[f"{name}.scores"])  # scores did train
    assert all(torch.equal(v, sign_model.state_dict()[k]) for k, v in before.items())  # input untouched
    signs = local_train(sign_model, x, y, epochs=3, lr=1.0, batch_size=16, seed=0)
    flipped = sum(int((signs[n] != 1)[masks[n]].sum()) for n in signs)
    assert flipped > 0
    again = local_train(sign_model, x, y, epochs=3, lr=1.0, batch_size=16, seed=0)
    assert all(torch.equal(signs[n], again[n]) for n in signs)
    # pruned weights get no gradient, so their code never moves from +1
    assert all(bool((signs[n][~masks[n]] == 1).all()) for n in signs)


def test_bad_arguments():
    layer = _linear([[1.0, 1.0]])
    with pytest.raises(ValueError, match="kind"):
        SupermaskLayer(layer, torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 2), kind="ternary")
    with pytest.raises(ValueError, match="shapes"):
        SupermaskLayer(layer, torch.ones(2, 1, dtype=torch.bool), torch.ones(1, 2))
    with pytest.raises(ValueError, match="Sequential"):
        to_sign_supermask(layer, {"weight": torch.ones(1, 2, dtype=torch.bool)})
    model = to_sign_supermask(nn.Sequential(layer), {"0.weight": torch.ones(1, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="optimizer"):
        train_scores(
            model, torch.ones(2, 2), torch.zeros(2, dtype=torch.long), 1, 0.1, 2, 0, optimizer="lbfgs"
        )
