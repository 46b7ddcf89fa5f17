"""Structured pruning through the sequential driver: the physically smaller model of every family equals
the full-size model with the same edits written as zeros (plus the updated weights and biases)."""

import copy

import pytest
import torch

from fedprune.masks import parse_pattern
from fedprune.models import find_blocks, find_prunable_layers, get_weight, set_weight_
from fedprune.pruners import get_pruner
from fedprune.sequential import prune_model_
from fedprune.structured.decide import Structure
from tests.tiny_models import ARCHITECTURES, random_windows, tiny_model

METHODS = ("magnitude", "wanda", "variance", "sparsegpt", "obs")


def _zeros_(block, edit):
    """Write ``edit`` into a full-size block as zeros (removed rows / columns), new weights and biases."""
    for name, (axis, index) in edit.kept.items():
        layer = find_prunable_layers(block)[name]
        weight = get_weight(layer)  # (out, in)
        keep = torch.zeros(weight.shape[0 if axis == "rows" else 1], dtype=torch.bool)
        keep[index] = True
        bias = None if layer.bias is None else layer.bias.detach().clone()
        if axis == "rows":
            weight[~keep] = 0
            if bias is not None:
                bias[~keep] = 0
        else:
            weight[:, ~keep] = 0
            if name in edit.weights:
                weight[:, keep] = edit.weights[name]
        if name in edit.biases:
            bias = edit.biases[name].clone()
        if bias is not None and layer.bias is None:
            parent, _, child = name.rpartition(".")
            dense = torch.nn.Linear(layer.in_features, layer.out_features, bias=True)
            setattr(block.get_submodule(parent), child, dense)
            layer = dense
        set_weight_(layer, weight)
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", METHODS)
def test_smaller_model_equals_zeros_in_the_full_model(arch, method):
    model = tiny_model(arch)
    dense = copy.deepcopy(model)
    ids = random_windows(6, 12)
    structure = Structure.for_model(model, 0.5, 0.5)
    report = prune_model_(
        model,
        ids,
        get_pruner(method),
        0.0,
        parse_pattern("structured"),
        2,
        progress=False,
        structure=structure,
    )
    _, blocks = find_blocks(dense)
    for index, edit in report.edits.items():
        _zeros_(blocks[index], edit)
    test_ids = random_windows(3, 12, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=test_ids).logits, dense(input_ids=test_ids).logits, atol=1e-5, rtol=1e-4
        )
    smaller = sum(p.numel() for p in model.parameters())
    assert smaller < sum(p.numel() for p in tiny_model(arch).parameters())
    for edit in report.edits.values():
        assert set(edit.report().values()) == {0.5}  # half the units of every coupled layer


def test_kept_indices_follow_the_method_not_the_position():
    model = tiny_model("llama")
    ids = random_windows(4, 12)
    structure = Structure.for_model(model, 0.5, 0.0)
    reports = [
        prune_model_(
            copy.deepcopy(model),
            ids,
            get_pruner(m),
            0.0,
            parse_pattern("structured"),
            2,
            progress=False,
            structure=structure,
        )
        for m in ("magnitude", "wanda")
    ]
    kept = [r.edits[0].kept["mlp.down_proj"][1] for r in reports]
    assert kept[0].numel() == kept[1].numel() == 32
    assert not torch.equal(kept[0], torch.arange(32)) or not torch.equal(kept[1], torch.arange(32))


def test_pattern_and_structure_go_together():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="structure"):
        prune_model_(
            model,
            random_windows(2, 8),
            get_pruner("wanda"),
            0.0,
            parse_pattern("structured"),
            2,
            progress=False,
        )


def test_mistral_is_a_llama_style_family():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=None,
    )
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    dense = copy.deepcopy(model)
    ids = random_windows(4, 12)
    structure = Structure.for_model(model, 0.5, 0.5)
    assert structure.family.name == "llama"
    report = prune_model_(model, ids, get_pruner("obs"), 0.0, parse_pattern("structured"), 2, progress=False,
                          structure=structure)
    _, blocks = find_blocks(dense)
    for index, edit in report.edits.items():
        _zeros_(blocks[index], edit)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
