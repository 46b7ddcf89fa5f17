"""Digits MLP and CNN: shapes, seeded init schemes, prunable weights and masking helpers."""

from __future__ import annotations

import math

import pytest
import torch

from fedprune.hidenseek.models import apply_masks_, build_model, masks_density, prunable_weights


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_output_shape_and_seeded_init(arch):
    model = build_model(arch, seed=0, hidden=16, channels=(4, 8))
    assert model(torch.rand(5, 64)).shape == (5, 10)
    same = build_model(arch, seed=0, hidden=16, channels=(4, 8))
    other = build_model(arch, seed=1, hidden=16, channels=(4, 8))
    weights = prunable_weights(model)
    assert all(torch.equal(w, prunable_weights(same)[n]) for n, w in weights.items())
    assert any(not torch.equal(w, prunable_weights(other)[n]) for n, w in weights.items())


def test_prunable_weight_names():
    assert list(prunable_weights(build_model("mlp", 0, hidden=8))) == [
        "layers.0.weight",
        "layers.2.weight",
        "layers.4.weight",
    ]
    assert list(prunable_weights(build_model("cnn", 0))) == [
        "features.0.weight",
        "features.2.weight",
        "classifier.weight",
    ]


def test_signed_constant_and_kaiming_scales():
    constant = prunable_weights(build_model("mlp", 0, init="signed_constant", hidden=32))
    first = constant["layers.0.weight"]  # fan_in 64
    assert torch.allclose(first.abs(), torch.full_like(first, math.sqrt(2 / 64)))
    assert 0.3 < float((first > 0).float().mean()) < 0.7
    kaiming = prunable_weights(build_model("mlp", 0, hidden=256))["layers.2.weight"]  # fan_in 256
    assert float(kaiming.detach().std()) == pytest.approx(math.sqrt(2 / 256), rel=0.05)
    with pytest.raises(ValueError):
        build_model("mlp", 0, init="xavier")
    with pytest.raises(ValueError):
        build_model("resnet", 0)


def test_biases_zero_when_enabled_and_masks_applied():
    model = build_model("mlp", 0, hidden=4, bias=True)
    assert float(model.layers[0].bias.detach().abs().sum()) == 0.0
    masks = {name: torch.zeros_like(w, dtype=torch.bool) for name, w in prunable_weights(model).items()}
    masks["layers.4.weight"][0, 0] = True
    apply_masks_(model, masks)
    assert int((model.layers[4].weight != 0).sum()) == 1
    assert float(model.layers[0].weight.detach().abs().sum()) == 0
    assert masks_density(masks) == pytest.approx(1 / (64 * 4 + 4 * 4 + 4 * 10))
