"""The coupling table: which rows and columns form a unit, checked against hand-written indices."""

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, MixtralConfig

from fedprune.structured.families import (
    FAMILIES,
    UnsupportedFamilyError,
    block_layout,
    family_of,
    geometry,
    valid_head_fractions,
)


def test_llama_kv_groups_own_their_query_heads_and_output_columns():
    config = LlamaConfig(hidden_size=8, intermediate_size=6, num_attention_heads=4, num_key_value_heads=2)
    family = family_of(config)
    shape = geometry(config, family)
    assert (shape.head_dim, shape.heads_per_group, shape.kv_groups) == (2, 2, 2)
    heads = block_layout(family, shape)["heads"]
    # group 1 = query heads 2 and 3 (rows 4..7), key/value head 1 (rows 2..3), o_proj columns 4..7
    assert heads.rows["self_attn.q_proj"][1].tolist() == [4, 5, 6, 7]
    assert heads.rows["self_attn.k_proj"][1].tolist() == [2, 3]
    assert heads.rows["self_attn.v_proj"][0].tolist() == [0, 1]
    assert heads.columns["self_attn.o_proj"][1].tolist() == [4, 5, 6, 7]
    ffn = block_layout(family, shape)["ffn"]
    assert ffn.units == 6 and ffn.rows["mlp.up_proj"][5].tolist() == [5]
    assert ffn.columns["mlp.down_proj"][:, 0].tolist() == list(range(6))


def test_gpt2_heads_take_their_slice_of_each_fused_third():
    config = GPT2Config(n_embd=6, n_head=3)
    family = family_of(config)
    shape = geometry(config, family)
    assert shape.ffn == 24  # n_inner None: 4 x n_embd
    heads = block_layout(family, shape)["heads"]
    # head 1 of 3 (head_dim 2): query rows 2,3; key rows 6+2, 6+3; value rows 12+2, 12+3
    assert heads.rows["attn.c_attn"][1].tolist() == [2, 3, 8, 9, 14, 15]
    assert heads.columns["attn.c_proj"][2].tolist() == [4, 5]


def test_unsupported_family_names_the_supported_ones():
    with pytest.raises(UnsupportedFamilyError, match="llama.*opt|gpt2"):
        family_of(MixtralConfig())


def test_valid_head_fractions_are_whole_groups():
    config = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3)
    shape = geometry(config, FAMILIES["llama"])
    assert valid_head_fractions(shape) == pytest.approx([0.0, 1 / 3, 2 / 3])
    assert torch.equal(
        block_layout(FAMILIES["llama"], shape)["heads"].rows["self_attn.q_proj"][2][:2],
        torch.tensor([384, 385]),
    )
