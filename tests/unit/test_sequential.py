"""collect_block_stats: shared inputs, early stop, and equality with a plain full-block reference."""

import pytest
import torch

from fedprune.models import find_blocks, find_prunable_layers
from fedprune.sequential import capture_block_inputs, collect_block_stats
from fedprune.stats import batch_stats, sum_stats
from tests.tiny_models import ARCHITECTURES, random_windows, tiny_model


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
