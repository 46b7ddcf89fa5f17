"""Block edits: each kind applies, round-trips the wire, votes and reports, against hand-made layers."""

import numpy as np
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedprune.allocation import Allocation
from fedprune.edits import KeptIndices, MaskEdit, WeightEdit, decode_edit
from fedprune.masks import parse_pattern
from fedprune.payload import PayloadError
from fedprune.pruners import get_pruner
from fedprune.sequential import prune_layers


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(4, 6)
        self.down = nn.Linear(6, 4, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


SHAPES = {"up": (6, 4), "down": (4, 6)}


def test_mask_edit_applies_dense_times_mask_and_round_trips():
    block = Block()
    masks = {"up": torch.rand(6, 4) > 0.5, "down": torch.rand(4, 6) > 0.5}
    dense = block.up.weight.detach().clone()
    edit = MaskEdit(masks)
    again = decode_edit("masks", edit.encode(), SHAPES)
    assert all(torch.equal(again.masks[n], masks[n]) for n in masks)
    edit.apply_(block)
    assert torch.equal(block.up.weight, dense * masks["up"])
    assert edit.report()["up"] == pytest.approx(1 - masks["up"].float().mean().item())
    assert torch.equal(edit.votes()["down"], masks["down"].int())


def test_weight_edit_round_trips_in_float32_and_its_masks_are_the_nonzeros():
    weights = {"up": torch.tensor([[0.0, 1.5, 0.0, -2.0]] * 6), "down": torch.zeros(4, 6)}
    edit = decode_edit("weights", WeightEdit(weights).encode(), SHAPES)
    assert torch.equal(edit.weights()["up"], weights["up"]) and edit.report() == {"up": 0.5, "down": 1.0}
    block = Block()
    edit.apply_(block)
    assert torch.equal(block.down.weight, torch.zeros(4, 6))


def test_kept_rows_and_columns_make_smaller_layers_with_the_same_outputs():
    block, x = Block(), torch.randn(5, 4)
    hidden = torch.relu(block.up(x))  # (5, 6)
    keep = torch.tensor([0, 2, 5])
    KeptIndices({"up": ("rows", keep), "down": ("columns", keep)}).apply_(block)
    assert (
        block.up.weight.shape == (3, 4) and block.up.bias.shape == (3,) and block.down.weight.shape == (4, 3)
    )
    # the kept neurons compute what they did; the removed ones no longer contribute
    assert torch.allclose(torch.relu(block.up(x)), hidden[:, keep])
    reference = hidden[:, keep] @ Block().down.weight.detach()[:, keep].t()
    assert torch.allclose(block(x), reference, atol=1e-6)


def test_kept_indices_shrink_gpt2_conv1d_too():
    layer = Conv1D(6, 4)  # (in 4, out 6), weight stored (4, 6)
    nn.init.normal_(layer.weight)
    x = torch.randn(3, 4)
    block = nn.Module()
    block.fc = layer
    KeptIndices({"fc": ("rows", torch.tensor([1, 4]))}).apply_(block)
    assert type(block.fc).__name__ == "Conv1D" and block.fc.weight.shape == (4, 2)
    assert torch.allclose(block.fc(x), layer(x)[:, [1, 4]])


def test_kept_indices_wire_votes_report_and_validation():
    edit = KeptIndices({"up": ("rows", torch.tensor([1, 3])), "down": ("columns", torch.tensor([0]))})
    arrays = edit.encode()
    assert (
        sorted(arrays) == ["kept.columns.down", "kept.rows.up"] and arrays["kept.rows.up"].dtype == np.int64
    )
    again = decode_edit("kept", arrays, SHAPES)
    assert torch.equal(again.kept["up"][1], torch.tensor([1, 3])) and again.kept["down"][0] == "columns"
    assert edit.votes(SHAPES)["up"].tolist() == [0, 1, 0, 1, 0, 0]
    assert edit.report(SHAPES) == {"up": pytest.approx(4 / 6), "down": pytest.approx(5 / 6)}
    bad = {
        "unsorted": {"kept.rows.up": np.array([3, 1])},
        "duplicate": {"kept.rows.up": np.array([1, 1])},
        "outside": {"kept.rows.up": np.array([6])},
        "dtype": {"kept.rows.up": np.array([1.0])},
        "layer": {"kept.rows.gate": np.array([1])},
        "axis": {"kept.diagonal.up": np.array([1])},
        "empty": {"kept.rows.up": np.array([], dtype=np.int64)},
    }
    for why, arrays in bad.items():
        with pytest.raises(PayloadError):
            decode_edit(
                "kept", {k: v.astype(np.int64) if why != "dtype" else v for k, v in arrays.items()}, SHAPES
            )
    with pytest.raises(PayloadError, match="unknown edit kind"):
        decode_edit("deltas", {}, SHAPES)


def test_an_allocation_gives_each_layer_its_own_sparsity():
    block = Block()
    allocation = Allocation(0.5, {"b.0.up": 0.25})
    results = prune_layers(
        block, {}, get_pruner("magnitude"), allocation, parse_pattern("unstructured"), (), "b.0"
    )
    assert results["up"].mask.float().mean().item() == pytest.approx(0.75)
    assert results["down"].mask.float().mean().item() == pytest.approx(0.5)
    uniform = prune_layers(block, {}, get_pruner("magnitude"), 0.5, parse_pattern("unstructured"), (), "b.0")
    assert torch.equal(uniform["down"].mask, results["down"].mask)
    with pytest.raises(ValueError):
        Allocation(0.5, {"x": 1.0})
