"""collect_block_stats: shared inputs, early stop, and equality with a plain full-block reference; per-block
kwargs: each block gets its own (mixed attention types), shared tensors stay shared."""

import pytest
import torch

from fedprune.models import find_blocks, find_prunable_layers
from fedprune.sequential import BlockInputs, capture_block_inputs, collect_block_stats, run_block
from fedprune.stats import batch_stats, sum_stats
from tests.tiny_models import ARCHITECTURES, MIXED_ATTENTION, random_windows, tiny_model


def _reference_stats(block, inputs, kind):
    """Per layer, the sum over micro-batches of the statistics of its input, full block each time."""
    layers = find_prunable_layers(block)
    parts = {name: [] for name in layers}
    handles = [
        layer.register_forward_hook(lambda _m, args, _o, name=name: parts[name].append(args[0]))
        for name, layer in layers.items()
    ]
    with torch.no_grad():
        for h, kw in zip(inputs.hidden, inputs.kwargs, strict=True):
            block(h, **kw)
    for handle in handles:
        handle.remove()
    return {name: sum_stats([batch_stats(kind, x) for x in xs]) for name, xs in parts.items()}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("kind", ["sq_norm", "hessian"])
def test_block_stats_equal_full_block_reference_and_stop_early(arch, kind):
    model = tiny_model(arch)
    inputs = capture_block_inputs(model, random_windows(6, 10), batch_size=2)  # 3 micro-batches
    _, blocks = find_blocks(model)
    block = blocks[0]
    layers = find_prunable_layers(block)
    expected = _reference_stats(block, inputs, kind)

    calls = {name: 0 for name in layers}
    handles = [
        layer.register_forward_hook(lambda *_a, name=name: calls.__setitem__(name, calls[name] + 1))
        for name, layer in layers.items()
    ]
    got = collect_block_stats(block, inputs, kind)
    for handle in handles:
        handle.remove()

    assert set(got) == set(layers)
    for name in layers:
        assert got[name].count == expected[name].count == 60
        assert torch.allclose(got[name].total, expected[name].total, rtol=1e-12, atol=1e-12), name
    # the last prunable layer to run computed its product only in the first micro-batch
    assert sorted(calls.values()) == [1] + [3] * (len(layers) - 1)


def test_layers_fed_the_same_tensor_share_one_stats_object():
    model = tiny_model("llama")
    inputs = capture_block_inputs(model, random_windows(4, 8), batch_size=2)
    _, blocks = find_blocks(model)
    got = collect_block_stats(blocks[0], inputs, "hessian")
    assert got["self_attn.q_proj"] is got["self_attn.k_proj"] is got["self_attn.v_proj"]
    assert got["mlp.gate_proj"] is got["mlp.up_proj"]
    assert got["self_attn.o_proj"] is not got["self_attn.q_proj"]
    assert got["mlp.down_proj"] is not got["mlp.up_proj"]


def _whole_model_reference(model, ids, kind, attention_mask=None):
    """Per ``(block, layer)``: float64 Σ x² or Σ xᵀx of the layer's input in ONE ordinary forward of ``ids``."""
    _, blocks = find_blocks(model)
    totals = {}

    def hook(key):
        def record(_module, args):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])  # (tokens, in)
            part = x.pow(2).sum(dim=0) if kind == "sq_norm" else x.T @ x
            totals[key] = totals[key] + part if key in totals else part

        return record

    handles = [
        layer.register_forward_pre_hook(hook((index, name)))
        for index, block in enumerate(blocks)
        for name, layer in find_prunable_layers(block).items()
    ]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False, attention_mask=attention_mask)
    for handle in handles:
        handle.remove()
    return totals


def _driver_stats(model, inputs, kind):
    """Per ``(block, layer)``: statistics from the sequential driver, no pruning."""
    _, blocks = find_blocks(model)
    out = {}
    for index, block in enumerate(blocks):
        for name, stats in collect_block_stats(block, inputs, kind).items():
            out[(index, name)] = stats
        inputs = run_block(block, inputs)
    return out


def _close(got, ref):
    return torch.allclose(got, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


@pytest.mark.parametrize("kind", ["sq_norm", "hessian"])
def test_driver_stats_equal_whole_model_forward_with_mixed_attention_types(kind):
    model = tiny_model(MIXED_ATTENTION)
    assert len(set(model.config.layer_types)) == 2
    ids = random_windows(6, 10)  # 10 tokens > sliding window 3
    inputs = capture_block_inputs(model, ids, batch_size=2)
    # transformers honours the layer types: sliding and full blocks get different masks
    masks = [kw[0]["attention_mask"] for kw in inputs.kwargs_per_block]
    assert masks[0] is masks[2]
    assert masks[1] is None or not torch.equal(masks[0], masks[1])

    expected = _whole_model_reference(model, ids, kind)
    got = _driver_stats(model, inputs, kind)
    assert set(got) == set(expected)
    for key, ref in expected.items():
        assert got[key].count == 60
        assert _close(got[key].total, ref), key

    # the check can fail: block 0's kwargs for every block (the old driver) give other statistics
    block0_only = BlockInputs(
        hidden=inputs.hidden, kwargs_per_block=[inputs.kwargs_per_block[0]] * len(masks), block=0
    )
    stale = _driver_stats(model, block0_only, kind)
    assert not all(_close(stale[key].total, ref) for key, ref in expected.items())


@pytest.mark.parametrize("kind", ["sq_norm", "hessian"])
def test_gpt2_mask_passed_by_position_reaches_every_block(kind):
    """GPT-2 gives its blocks the attention mask by position; with eager attention it is a tensor that
    must be recorded, or the re-run blocks would attend to padding (here: a padded window)."""
    model = tiny_model("gpt2")
    model.config._attn_implementation = "eager"
    ids = random_windows(4, 10)
    attention = torch.ones_like(ids)
    attention[0, :3] = 0  # left padding in window 0
    inputs = capture_block_inputs_with_mask(model, ids, attention)
    assert all(isinstance(kw[0].get("attention_mask"), torch.Tensor) for kw in inputs.kwargs_per_block)
    expected = _whole_model_reference(model, ids, kind, attention)
    got = _driver_stats(model, inputs, kind)
    for key, ref in expected.items():
        assert _close(got[key].total, ref), key


def capture_block_inputs_with_mask(model, ids, attention):
    """capture_block_inputs, with an attention mask given to the model's forward."""
    original = model.forward

    def forward(*args, **kwargs):
        return original(*args, attention_mask=attention[: kwargs["input_ids"].shape[0]], **kwargs)

    model.forward = forward
    try:
        return capture_block_inputs(model, ids, batch_size=4)
    finally:
        del model.forward


def test_block_chain_reproduces_hidden_states_with_mixed_attention_types():
    model = tiny_model(MIXED_ATTENTION)
    ids = random_windows(5, 12)
    with torch.no_grad():
        expected = model(input_ids=ids, output_hidden_states=True).hidden_states
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, ids, batch_size=2)
    for index, block in enumerate(blocks[:-1]):
        assert inputs.block == index
        inputs = run_block(block, inputs)
        assert torch.allclose(torch.cat(inputs.hidden), expected[index + 1], atol=1e-5)


def test_capture_runs_no_block_compute_and_restores_blocks():
    model = tiny_model(MIXED_ATTENTION)
    _, blocks = find_blocks(model)
    calls = []
    handles = [
        layer.register_forward_hook(lambda *_a: calls.append(1))
        for block in blocks
        for layer in find_prunable_layers(block).values()
    ]
    inputs = capture_block_inputs(model, random_windows(4, 8), batch_size=2)
    for handle in handles:
        handle.remove()
    assert calls == []
    assert all("forward" not in vars(block) for block in blocks)
    assert [len(kw) for kw in inputs.kwargs_per_block] == [2, 2, 2]
    assert inputs.block == 0 and inputs.kwargs is inputs.kwargs_per_block[0]


def _shared_across_blocks(kwargs_per_block):
    """Per micro-batch, every tensor kwarg (and position-embedding tuple) of block 1+ is block 0's object."""
    for batch, first in enumerate(kwargs_per_block[0]):
        tensors = {key: v for key, v in first.items() if isinstance(v, torch.Tensor | tuple)}
        assert {"position_ids", "position_embeddings"} <= set(tensors)
        for later in kwargs_per_block[1:]:
            for key, value in tensors.items():
                assert later[batch][key] is value, key
            cos, sin = later[batch]["position_embeddings"]
            assert cos is first["position_embeddings"][0] and sin is first["position_embeddings"][1]


def test_kwargs_tensors_stay_shared_across_blocks_and_through_site_state(tmp_path, monkeypatch):
    from fedprune.protocols.site_state import load_state, save_state
    from fedprune.site import SiteState

    model = tiny_model("llama")
    inputs = capture_block_inputs(model, random_windows(4, 8), batch_size=2)
    _shared_across_blocks(inputs.kwargs_per_block)
    assert inputs.kwargs_per_block[0][0]["position_ids"] is not inputs.kwargs_per_block[0][1]["position_ids"]

    _, blocks = find_blocks(model)
    moved = run_block(blocks[0], inputs)
    assert moved.block == 1 and moved.kwargs is inputs.kwargs_per_block[1]

    monkeypatch.setenv("FEDPRUNE_CACHE", str(tmp_path))
    save_state("run", "site", SiteState(inputs=moved, block=1, tokens=moved.num_tokens))
    loaded = load_state("run", "site").inputs
    assert loaded.block == 1
    _shared_across_blocks(loaded.kwargs_per_block)
    assert all(torch.equal(a, b) for a, b in zip(loaded.hidden, moved.hidden, strict=True))
