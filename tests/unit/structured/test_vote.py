"""Voting on whole units: hand-made counts -> kept units (ties: lower id), a site's edit -> its 0/1 votes
-> the same edit back (every family, GPT-2's fused c_attn included), and malformed edits refused."""

import pytest
import torch

from fedprune.edits import StructuredEdit
from fedprune.models import find_blocks
from fedprune.pruners import get_pruner
from fedprune.structured.decide import Structure
from fedprune.structured.vote import (
    block_counts,
    kept_units,
    select_units,
    unit_votes,
    vote_masks,
    vote_shapes,
    voted_edit,
)
from tests.tiny_models import ARCHITECTURES, tiny_model


def test_most_voted_units_are_kept_and_ties_keep_the_lower_id():
    counts = torch.tensor([3, 0, 2, 2, 1, 3], dtype=torch.int32)
    assert select_units(counts, 3).tolist() == [0, 2, 5]  # 3, 3, then 2 (unit 2 before unit 3)
    assert select_units(counts, 4).tolist() == [0, 5]
    assert select_units(counts, 1).tolist() == [0, 2, 3, 4, 5]
    assert select_units(torch.zeros(4, dtype=torch.int32), 2).tolist() == [0, 1]  # all tied
    assert select_units(torch.tensor([1, 1, 2, 2]), 1).tolist() == [0, 2, 3]  # unit 1 loses the tie
    with pytest.raises(ValueError, match="cannot remove 4 of 4"):
        select_units(torch.zeros(4), 4)


def _site_edit(arch):
    model = tiny_model(arch)
    structure = Structure.for_model(model, 0.5, 0.5)
    block = find_blocks(model)[1][0]
    return structure, block, structure.edit(block, {}, get_pruner("magnitude"))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_sites_edit_as_unit_votes_gives_the_same_edit_back(arch):
    structure, block, edit = _site_edit(arch)
    votes = unit_votes(edit, structure)
    layout = structure.layout
    assert set(votes) == {"ffn", "heads"}
    for granularity, vote in votes.items():
        assert vote.dtype == torch.int32 and vote.shape == (layout[granularity].units,)
        assert int(vote.sum()) == layout[granularity].units - structure.counts()[granularity]
    again = voted_edit(block, structure, votes)
    assert again.kept.keys() == edit.kept.keys() and again.attributes == edit.attributes
    for name, (axis, index) in edit.kept.items():
        assert again.kept[name][0] == axis and torch.equal(again.kept[name][1], index), name
    assert again.shapes == edit.shapes and not again.weights and not again.biases


def test_votes_of_three_sites_summed_on_the_wire_layout():
    structure, block, edit = _site_edit("llama")  # 64 neurons (32 removed), 2 key/value groups (1)
    assert vote_shapes(structure, "1.") == {"1.ffn": (1, 64), "1.heads": (1, 2)}
    ffn = torch.zeros(3, 64, dtype=torch.int32)
    ffn[:, :32] = 1  # all three keep neurons 0..31 ...
    ffn[0, [0, 1]], ffn[0, [40, 41]] = 0, 1  # ... but site 0 keeps 40, 41 instead of 0, 1
    heads = torch.tensor([[0, 1], [1, 0], [0, 1]], dtype=torch.int32)
    masks = [vote_masks({"ffn": f, "heads": h}, "1.") for f, h in zip(ffn, heads, strict=True)]
    summed = {k: sum(m[k].to(torch.int32) for m in masks) for k in masks[0]}
    counts = block_counts(summed, "1.")
    assert counts["ffn"].shape == (64,) and counts["heads"].tolist() == [1, 2]
    edit = voted_edit(block, structure, counts)
    assert edit.kept["mlp.down_proj"][1].tolist() == list(range(32))  # 2 votes beat 1
    assert edit.kept["self_attn.k_proj"][1].tolist() == list(range(8, 16))  # group 1 (head_dim 8)
    assert edit.attributes == {}  # Llama's attention reads its head counts from the weights


def test_an_edit_that_keeps_part_of_a_unit_or_the_wrong_count_is_refused():
    structure, _, edit = _site_edit("llama")
    axis, columns = edit.kept["self_attn.o_proj"]
    partial = {**edit.kept, "self_attn.o_proj": (axis, columns[1:])}
    with pytest.raises(ValueError, match="not whole heads units"):
        kept_units(StructuredEdit(partial, edit.shapes), structure)
    axis, columns = edit.kept["mlp.down_proj"]
    more = torch.arange(40)
    with pytest.raises(ValueError, match="keeps 40 of 64 ffn units, not 32"):
        kept_units(StructuredEdit({**edit.kept, "mlp.down_proj": (axis, more)}, edit.shapes), structure)
    with pytest.raises(ValueError, match="need 2 vote counts for the heads units"):
        voted_edit(find_blocks(tiny_model("llama"))[1][0], structure, {"ffn": torch.zeros(64)})
