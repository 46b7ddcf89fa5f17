"""ignore patterns, check_prunable and sparsity_report: nothing inside a decoder block is skipped silently.

Sizes below are computed by hand from the configs in tests/tiny_models.py (hidden 32, 4 heads of 8, 2 KV
heads, 2 blocks; Llama intermediate 64; MoE: 4 experts of 16, Qwen2-MoE shared expert of 32).
"""

import pytest
import torch

from fedprune.aggregation.block import vote_model_from_counts_
from fedprune.aggregation.mask_vote import vote_counts
from fedprune.masks import parse_pattern
from fedprune.models import (
    IgnorePatternError,
    UnprunableParameterError,
    check_prunable,
    find_blocks,
    find_prunable_layers,
    get_weight,
    is_ignored,
    model_sparsity,
    prunable_parameter_count,
    sparsity_report,
)
from fedprune.pruners import get_pruner
from fedprune.sequential import capture_block_inputs, collect_block_stats, prune_model_
from fedprune.site import block_layer_shapes, local_masks
from tests.tiny_models import ARCHITECTURES, MOE_ARCHITECTURES, random_windows, tiny_model

LLAMA_LAYERS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
EXPECTED_LAYERS = {
    "llama": LLAMA_LAYERS,
    "qwen2": LLAMA_LAYERS,
    "opt": ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
}
MOE_LAYERS = {
    "qwen2_moe": LLAMA_LAYERS[:4]
    + ["mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"]
    + ["mlp.shared_expert_gate"],
    "mixtral": LLAMA_LAYERS[:4],
}
MOE_DENSE = ("mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj")
MOE_IGNORE = ("mlp.experts", "mlp.gate")
# per block: attention q 1024 + k 512 + v 512 + o 1024 = 3072; Qwen2-MoE adds shared expert 3·1024 + gate 32
MOE_PRUNED = {"qwen2_moe": 2 * (3072 + 3072 + 32), "mixtral": 2 * 3072}
# per block: router 4·32 + gate_up 4·32·32 + down 4·32·16 = 128 + 4096 + 2048
MOE_IGNORED = 2 * (128 + 4096 + 2048)
# per block 1-D: two norms 2·32, Qwen2 q/k/v biases 32 + 16 + 16
MOE_ONE_D = {"qwen2_moe": 2 * (64 + 64), "mixtral": 2 * 64}


def _windows():
    return random_windows(6, 16)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_default_layers_and_check_unchanged_for_dense_models(arch):
    model = tiny_model(arch)
    blocks_name, blocks = find_blocks(model)
    for index, block in enumerate(blocks):
        assert list(find_prunable_layers(block)) == EXPECTED_LAYERS[arch]
        assert list(find_prunable_layers(block, (), f"{blocks_name}.{index}")) == EXPECTED_LAYERS[arch]
    check_prunable(model)  # dense models have nothing unprunable
    report = sparsity_report(model)
    assert report.ignored == {} and report.unprunable == {} and report.ignored_weights == 0
    assert report.pruned_weights == prunable_parameter_count(model)
    assert report.block_parameters == sum(p.numel() for p in blocks.parameters())
    assert report.sparsity == model_sparsity(model) == 0.0


def test_default_prune_gives_the_masks_of_each_layer_alone():
    """Magnitude masks depend only on each dense weight: prune every expected layer by hand."""
    pruner, pattern = get_pruner("magnitude"), parse_pattern("unstructured")
    reference = tiny_model("llama")
    _, ref_blocks = find_blocks(reference)
    model = tiny_model("llama")
    report = prune_model_(model, _windows(), pruner, 0.5, pattern, 4, False, keep_masks=True)
    expected = {
        f"{i}.{name}": pruner.prune(get_weight(block.get_submodule(name)), None, 0.5, pattern).mask
        for i, block in enumerate(ref_blocks)
        for name in LLAMA_LAYERS
    }
    assert list(report.masks) == list(expected)
    for key, mask in expected.items():
        assert torch.equal(report.masks[key], mask), key
    assert report.ignored_layers == []
    assert model_sparsity(model) == 0.5


def test_is_ignored_matches_relative_qualified_and_enclosing_names():
    prefix = "model.layers.0"
    assert is_ignored("self_attn.o_proj.weight", ("*.o_proj",), prefix)
    assert is_ignored("self_attn.o_proj.weight", ("self_attn.o_proj",))
    assert is_ignored("mlp.down_proj.weight", ("mlp.*",))
    assert is_ignored("mlp.down_proj.weight", ("mlp",))  # an enclosing module
    assert is_ignored("mlp.down_proj.weight", ("model.layers.0.mlp.down_proj",), prefix)
    assert is_ignored("mlp.down_proj.weight", ("model.layers.0.*",), prefix)
    assert is_ignored("mlp.down_proj.weight", ("model.layers.0",), prefix)  # the whole block
    assert not is_ignored("mlp.down_proj.weight", ("model.layers.1.*",), prefix)
    assert not is_ignored("mlp.down_proj.weight", ("model.layers.0.*",))  # no prefix: relative only
    assert not is_ignored("mlp.down_proj.weight", ("down_proj",))  # not a suffix match
    assert not is_ignored("mlp.down_proj.weight", ("MLP.*",))  # case-sensitive
    assert not is_ignored("mlp.down_proj.weight", ())
    with pytest.raises(TypeError, match="string"):
        is_ignored("mlp.down_proj.weight", "*.o_proj")


def test_llama_ignore_o_proj_stays_dense_and_rest_at_half():
    dense = tiny_model("llama")
    model = tiny_model("llama")
    ignore = ("*.o_proj",)
    report = prune_model_(
        model, _windows(), get_pruner("wanda"), 0.5, parse_pattern("unstructured"), 4, False, ignore=ignore
    )
    _, blocks = find_blocks(model)
    _, dense_blocks = find_blocks(dense)
    assert report.ignored_layers == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    assert sorted(report.layer_sparsity) == sorted(
        f"model.layers.{i}.{n}" for i in range(2) for n in LLAMA_LAYERS if n != "self_attn.o_proj"
    )
    for block, dense_block in zip(blocks, dense_blocks, strict=True):
        assert torch.equal(block.self_attn.o_proj.weight, dense_block.self_attn.o_proj.weight)
        for name in LLAMA_LAYERS:
            if name != "self_attn.o_proj":
                assert (block.get_submodule(name).weight == 0).float().mean().item() == 0.5, name
    # by hand: per block q 1024 + k 512 + v 512 + gate/up/down 3·2048 = 8192; o 1024; norms 2·32
    cover = sparsity_report(model, ignore)
    assert cover.pruned_weights == 2 * 8192 == prunable_parameter_count(model, ignore)
    assert cover.zeros == 8192 and cover.sparsity == 0.5 == model_sparsity(model, ignore)
    assert cover.ignored == {f"model.layers.{i}.self_attn.o_proj.weight": 1024 for i in range(2)}
    assert cover.ignored_weights == 2048 and cover.unprunable == {}
    assert cover.block_parameters == 2 * (8192 + 1024 + 64)
    assert cover.coverage == 16384 / 18560
    # without ignore the dense o_proj counts in: 8192 zeros over 18432 weights
    assert model_sparsity(model) == 8192 / 18432


def test_ignored_layer_gets_no_stats_and_other_masks_of_block_0_unchanged():
    windows, pruner, pattern = _windows(), get_pruner("sparsegpt"), parse_pattern("2:4")
    model = tiny_model("llama")
    inputs = capture_block_inputs(model, windows, 2)
    block = find_blocks(model)[1][0]
    stats = collect_block_stats(block, inputs, "hessian", None, ("*.o_proj",), "model.layers.0")
    assert list(stats) == [n for n in LLAMA_LAYERS if n != "self_attn.o_proj"]
    default = prune_model_(tiny_model("llama"), windows, pruner, 0.5, pattern, 4, False, keep_masks=True)
    ignored = prune_model_(
        tiny_model("llama"), windows, pruner, 0.5, pattern, 4, False, keep_masks=True, ignore=("*.o_proj",)
    )
    # block 0 sees the same dense inputs, so its other masks are those of the default run
    block0 = [k for k in default.masks if k.startswith("0.") and k != "0.self_attn.o_proj"]
    assert [k for k in ignored.masks if k.startswith("0.")] == block0
    for key in block0:
        assert torch.equal(ignored.masks[key], default.masks[key]), key


def test_qualified_and_module_patterns():
    model = tiny_model("llama")
    dense = tiny_model("llama")
    report = prune_model_(
        model,
        _windows(),
        get_pruner("magnitude"),
        0.5,
        parse_pattern("unstructured"),
        4,
        False,
        ignore=("model.layers.0.*", "mlp"),
    )
    assert report.ignored_layers == [f"model.layers.0.{n}" for n in LLAMA_LAYERS] + [
        f"model.layers.1.{n}" for n in LLAMA_LAYERS[4:]
    ]
    assert list(report.layer_sparsity) == [f"model.layers.1.{n}" for n in LLAMA_LAYERS[:4]]
    for name, param in find_blocks(model)[1][0].named_parameters():
        assert torch.equal(param, find_blocks(dense)[1][0].get_parameter(name)), name


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_moe_experts_and_router_are_refused_by_name(arch, monkeypatch):
    model = tiny_model(arch)
    with pytest.raises(UnprunableParameterError) as err:
        check_prunable(model)
    assert isinstance(err.value, ValueError)
    assert err.value.names == tuple(f"model.layers.{i}.{n}" for i in range(2) for n in MOE_DENSE)
    message = str(err.value)
    assert "model.layers.0.mlp.experts.gate_up_proj (4, 32, 32)" in message
    assert "model.layers.1.mlp.experts.down_proj (4, 32, 16)" in message
    assert "model.layers.0.mlp.gate.weight (4, 32)" in message
    assert "ignore" in message

    # the driver refuses before any work (the capture of block inputs is the first step)
    def no_capture(*_args):
        raise AssertionError("capture_block_inputs ran before the check")

    monkeypatch.setattr("fedprune.sequential.capture_block_inputs", no_capture)
    with pytest.raises(UnprunableParameterError):
        prune_model_(model, _windows(), get_pruner("wanda"), 0.5, parse_pattern("unstructured"), 4, False)
    assert torch.equal(
        model.model.layers[0].self_attn.q_proj.weight,
        tiny_model(arch).model.layers[0].self_attn.q_proj.weight,
    )


@pytest.mark.parametrize("ignore", [MOE_IGNORE, ("*.experts.*", "*.gate.weight"), MOE_DENSE])
def test_moe_patterns_covering_experts_pass(ignore):
    check_prunable(tiny_model("qwen2_moe"), ignore)


def test_partial_or_typo_patterns_raise():
    model = tiny_model("qwen2_moe")
    with pytest.raises(UnprunableParameterError) as err:
        check_prunable(model, ("mlp.experts",))  # router forgotten
    assert err.value.names == ("model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight")
    with pytest.raises(IgnorePatternError, match="mlp.expert'") as err:
        check_prunable(model, (*MOE_IGNORE, "mlp.expert"))
    assert err.value.patterns == ("mlp.expert",)
    with pytest.raises(IgnorePatternError, match="self_atn"):
        check_prunable(tiny_model("llama"), ("*.self_atn.o_proj",))
    with pytest.raises(IgnorePatternError):
        check_prunable(tiny_model("llama"), ("lm_head",))  # outside the blocks: never pruned anyway
    with pytest.raises(TypeError):
        check_prunable(model, "mlp.experts")


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
@pytest.mark.parametrize("pruner", ["magnitude", "wanda", "sparsegpt"])
def test_prune_moe_with_ignore(arch, pruner):
    dense = tiny_model(arch)
    model = tiny_model(arch)
    ids = _windows()
    report = prune_model_(
        model, ids, get_pruner(pruner), 0.5, parse_pattern("unstructured"), 4, False, ignore=MOE_IGNORE
    )
    assert list(report.layer_sparsity) == [
        f"model.layers.{i}.{n}" for i in range(2) for n in MOE_LAYERS[arch]
    ]
    assert set(report.layer_sparsity.values()) == {0.5}
    assert report.ignored_layers == []  # the router is not an nn.Linear: no prunable layer was skipped
    dense_blocks, blocks = find_blocks(dense)[1], find_blocks(model)[1]
    for block, dense_block in zip(blocks, dense_blocks, strict=True):
        for name in MOE_DENSE:
            assert torch.equal(block.get_parameter(name), dense_block.get_parameter(name)), name
        for name in MOE_LAYERS[arch]:
            assert (block.get_submodule(name).weight == 0).float().mean().item() == 0.5, name
    cover = sparsity_report(model, MOE_IGNORE)
    assert cover.pruned_weights == MOE_PRUNED[arch] and cover.zeros == MOE_PRUNED[arch] // 2
    assert cover.sparsity == 0.5
    assert cover.ignored == {
        f"model.layers.{i}.{n}": size
        for i in range(2)
        for n, size in zip(MOE_DENSE, (128, 4096, 2048), strict=True)
    }
    assert cover.ignored_weights == MOE_IGNORED and cover.unprunable == {}
    total = MOE_PRUNED[arch] + MOE_IGNORED + MOE_ONE_D[arch]
    assert cover.block_parameters == total == sum(p.numel() for p in blocks.parameters())
    assert cover.coverage == MOE_PRUNED[arch] / total
    # without ignore nothing is hidden: the experts are listed as unprunable
    assert sparsity_report(model).unprunable == cover.ignored
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_one_shot_vote_with_ignore_leaves_layer_dense():
    model, dense = tiny_model("llama"), tiny_model("llama")
    pruner, pattern, ignore = get_pruner("wanda"), parse_pattern("unstructured"), ("*.o_proj",)
    assert list(block_layer_shapes(model, 0, ignore)) == [n for n in LLAMA_LAYERS if n != "self_attn.o_proj"]
    sites = [
        local_masks(model, random_windows(4, 16, seed=s), pruner, 0.5, pattern, 2, ignore) for s in (1, 2)
    ]
    assert "0.self_attn.o_proj" not in sites[0]
    counts = {key: vote_counts([s[key] for s in sites]) for key in sites[0]}
    masks = vote_model_from_counts_(model, counts, 2, 0.5, pattern, "layer", False, 0, ignore)
    assert list(masks[1]) == [n for n in LLAMA_LAYERS if n != "self_attn.o_proj"]
    assert torch.equal(
        model.model.layers[1].self_attn.o_proj.weight, dense.model.layers[1].self_attn.o_proj.weight
    )
    assert model_sparsity(model, ignore) == 0.5
