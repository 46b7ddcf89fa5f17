"""Depth pruning: influence sums, the choice of blocks and attention sublayers, Gate-Norm scores, and the
physically shallower model against the dense model with the same blocks skipped and attention zeroed."""

import copy

import pytest
import torch

from fedprune import load_pruned
from fedprune.masks import parse_pattern
from fedprune.models import find_blocks
from fedprune.outputs import save_model_atomic
from fedprune.pruners import get_pruner
from fedprune.sequential import prune_model_
from fedprune.structured.decide import Structure
from fedprune.structured.depth import ZeroAttention, cosine_distance_sum, gatenorm_scores, lowest
from fedprune.structured.saved import STRUCTURE_FILE, config_updates, finalize_config_, structure_record
from tests.tiny_models import ARCHITECTURES, random_windows
from tests.tiny_models import _configs as tiny_configs


def _deep(arch, layers=4):
    cls, config = tiny_configs()[arch]
    config = copy.deepcopy(config)
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(config, key):
            setattr(config, key, layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[0]] * layers
    torch.manual_seed(0)
    return cls(config).eval()


def test_cosine_distance_sum_by_hand():
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([[0.0, 2.0], [2.0, 2.0]])  # cos 0 and 1
    assert cosine_distance_sum(x, y).item() == pytest.approx(1.0)


def test_lowest_skips_excluded_and_breaks_ties_by_index():
    assert lowest(torch.tensor([3.0, 1.0, 1.0, 0.5]), 2) == [1, 3]
    assert lowest(torch.tensor([3.0, 1.0, 1.0, 0.5]), 2, exclude=[3]) == [1, 2]
    with pytest.raises(ValueError):
        lowest(torch.tensor([1.0, 2.0]), 2, exclude=[0])


def _dense_influence(model, ids):
    """Per block: Σ(1 − cos) of its input vs output and of its input vs input + attention output (hooks)."""
    _, blocks = find_blocks(model)
    names = {"llama": "self_attn", "qwen2": "self_attn", "opt": "self_attn", "gpt2": "attn"}
    attn_name = names[model.config.model_type]
    block_sums, attn_sums, record = [], [], {}
    hooks = []
    for i, block in enumerate(blocks):
        hooks.append(
            block.register_forward_hook(
                lambda m, a, k, o, i=i: record.__setitem__(
                    ("b", i),
                    (k.get("hidden_states", a[0] if a else None), o[0] if isinstance(o, tuple) else o),
                ),
                with_kwargs=True,
            )
        )
        hooks.append(
            block.get_submodule(attn_name).register_forward_hook(
                lambda m, a, o, i=i: record.__setitem__(("a", i), o[0])
            )
        )
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    for i in range(len(blocks)):
        x, y = record[("b", i)]
        cos = torch.nn.functional.cosine_similarity(
            x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double(), dim=-1
        )
        block_sums.append((1 - cos).sum().item())
        z = x + record[("a", i)]
        cos = torch.nn.functional.cosine_similarity(
            x.reshape(-1, x.shape[-1]).double(), z.reshape(-1, z.shape[-1]).double(), dim=-1
        )
        attn_sums.append((1 - cos).sum().item())
    return block_sums, attn_sums


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_removed_blocks_and_attention_equal_skipping_them_in_the_dense_model(arch, tmp_path):
    model = _deep(arch)
    dense = copy.deepcopy(model)
    ids = random_windows(4, 12)
    blocks_inf, attn_inf = _dense_influence(dense, ids)
    structure = Structure.for_model(model, 0.0, 0.0, blocks=1, attention=1)
    report = prune_model_(
        model,
        ids,
        get_pruner("wanda"),
        0.0,
        parse_pattern("structured"),
        4,
        progress=False,
        structure=structure,
    )
    removed_block = int(torch.tensor(blocks_inf).argmin())
    removed_attention = min((v, i) for i, v in enumerate(attn_inf) if i != removed_block)[1]
    assert report.depth.blocks == (removed_block,) and report.depth.attention == (removed_attention,)
    assert len(find_blocks(model)[1]) == 3
    # reference: the dense model with that block passing its input on and that attention adding zero
    _, dense_blocks = find_blocks(dense)
    dense_blocks[removed_block].register_forward_hook(
        lambda m, a, k, o: (
            (k.get("hidden_states", a[0] if a else None),) + tuple(o[1:])
            if isinstance(o, tuple)
            else k.get("hidden_states", a[0] if a else None)
        ),
        with_kwargs=True,
    )
    attn = dense_blocks[removed_attention].get_submodule(structure.family.attention)
    attn.register_forward_hook(lambda m, a, o: (torch.zeros_like(o[0]),) + tuple(o[1:]))
    test_ids = random_windows(2, 10, seed=4)
    with torch.no_grad():
        expected = dense(input_ids=test_ids).logits
        torch.testing.assert_close(model(input_ids=test_ids).logits, expected, atol=1e-5, rtol=1e-4)
    loadable = finalize_config_(model, structure.family, structure.shape)
    assert not loadable  # a block without attention: the config cannot say so
    save_model_atomic(
        model,
        None,
        tmp_path / "m",
        {STRUCTURE_FILE: structure_record(model, loadable)},
        config_updates(model, loadable),
    )
    with torch.no_grad():
        torch.testing.assert_close(
            load_pruned(tmp_path / "m")(input_ids=test_ids).logits, expected, atol=1e-5, rtol=1e-4
        )


def test_blocks_alone_load_with_from_pretrained_and_generate(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _deep("llama")
    structure = Structure.for_model(model, 0.5, 0.0, blocks=2)
    prune_model_(
        model,
        random_windows(4, 12),
        get_pruner("wanda"),
        0.0,
        parse_pattern("structured"),
        4,
        progress=False,
        structure=structure,
    )
    assert finalize_config_(model, structure.family, structure.shape)
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.num_hidden_layers == 2
    ids = random_windows(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert loaded.generate(
        ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0
    ).shape == (1, 11)


def test_generation_with_a_removed_first_attention_matches_no_cache():
    model = _deep("llama", layers=2)
    from fedprune.structured.depth import remove_attention_

    remove_attention_(find_blocks(model)[1][0], Structure.for_model(model, 0.0, 0.0).family)
    assert isinstance(find_blocks(model)[1][0].self_attn, ZeroAttention)
    ids = random_windows(1, 6)
    cached = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    uncached = model.generate(
        ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False
    )
    assert torch.equal(cached, uncached)


def test_gatenorm_scores_equal_the_frobenius_norms_of_query_key_products():
    model = _deep("llama", layers=3)
    structure = Structure.for_model(model, 0.0, 0.0)
    got = gatenorm_scores(model, structure.family, structure.shape)
    shape = structure.shape
    for b, block in enumerate(find_blocks(model)[1]):
        gamma = block.input_layernorm.weight.double()
        q = block.self_attn.q_proj.weight.double() * gamma
        k = block.self_attn.k_proj.weight.double() * gamma
        norms = []
        for h in range(shape.heads):
            g = h // shape.heads_per_group
            qh = q[h * shape.head_dim : (h + 1) * shape.head_dim]
            kg = k[g * shape.head_dim : (g + 1) * shape.head_dim]
            norms.append(torch.linalg.matrix_norm(qh.T @ kg))
        assert got[b].item() == pytest.approx(torch.stack(norms).mean().item(), rel=1e-9)


def test_gatenorm_removes_the_least_coupled_attention_without_data():
    model = _deep("llama", layers=3)
    with torch.no_grad():
        find_blocks(model)[1][1].self_attn.q_proj.weight.mul_(1e-3)  # block 1 couples least
    structure = Structure.for_model(model, 0.0, 0.0, attention=1)
    report = prune_model_(
        model,
        random_windows(2, 8),
        get_pruner("gatenorm"),
        0.0,
        parse_pattern("structured"),
        2,
        progress=False,
        structure=structure,
    )
    assert report.depth.attention == (1,) and report.calib_tokens == 0
    assert isinstance(find_blocks(model)[1][1].self_attn, ZeroAttention)
