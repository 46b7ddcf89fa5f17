"""End-to-end sequential pruning of tiny random-init models of four architectures."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from fedprune.masks import parse_pattern
from fedprune.models import find_blocks, find_prunable_layers, get_weight
from fedprune.pruners import get_pruner
from fedprune.sequential import capture_block_inputs, prune_model_, run_block
from tests.tiny_models import ARCHITECTURES, random_windows, tiny_model

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_block_chain_reproduces_model_hidden_states(arch):
    model = tiny_model(arch)
    ids = random_windows(5, 12)
    expected = model(input_ids=ids, output_hidden_states=True).hidden_states
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, ids, batch_size=2)
    assert torch.allclose(torch.cat(inputs.hidden), expected[0], atol=1e-6)
    for index, block in enumerate(blocks[:-1]):
        inputs = run_block(block, inputs)
        assert torch.allclose(torch.cat(inputs.hidden), expected[index + 1], atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("pruner", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_prune_end_to_end(arch, pruner, pattern, tmp_path):
    model = tiny_model(arch)
    ids = random_windows(6, 16)
    report = prune_model_(model, ids, get_pruner(pruner), 0.5, parse_pattern(pattern), 4, False)
    _, blocks = find_blocks(model)
    layers = [layer for block in blocks for layer in find_prunable_layers(block).values()]
    assert len(report.layer_sparsity) == len(layers) > 0
    for layer in layers:
        weight = get_weight(layer)
        assert (weight == 0).float().mean().item() == pytest.approx(0.5)
        if pattern == "2:4":
            nonzero = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
            assert bool((nonzero <= 2).all())
    # embeddings and lm_head untouched
    assert (model.get_input_embeddings().weight == tiny_model(arch).get_input_embeddings().weight).all()
    logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(reloaded(input_ids=ids).logits, logits, atol=1e-6)
