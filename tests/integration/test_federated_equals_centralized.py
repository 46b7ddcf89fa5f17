"""In-process federation (the same library steps the Flower apps call) against centralized pruning."""

import copy

import pytest
import torch

from fedprune.aggregation.block import aggregate_stats, prune_block_from_stats_, vote_block_
from fedprune.edits import WeightEdit
from fedprune.masks import parse_pattern
from fedprune.models import find_blocks, find_prunable_layers, get_weight
from fedprune.pruners import get_pruner
from fedprune.sequential import prune_model_
from fedprune.site import advance_site_, local_masks, site_block_masks, site_block_stats, start_site
from tests.tiny_models import random_windows, tiny_model

pytestmark = pytest.mark.integration


def _weights(model):
    _, blocks = find_blocks(model)
    return {
        f"{i}.{n}": get_weight(m) for i, b in enumerate(blocks) for n, m in find_prunable_layers(b).items()
    }


def _stats_sync(model, site_ids, pruner, sparsity, pattern):
    sites = [(copy.deepcopy(model), None) for _ in site_ids]
    sites = [(m, start_site(m, ids, 2)) for (m, _), ids in zip(sites, site_ids, strict=True)]
    _, blocks = find_blocks(model)
    for b in range(len(blocks)):
        stats = aggregate_stats([site_block_stats(m, s, b, pruner.stat_kind) for m, s in sites])
        _, weights = prune_block_from_stats_(model, b, stats, pruner, sparsity, pattern)
        for m, s in sites:
            advance_site_(m, s, b, WeightEdit(weights))
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("pruner_name", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_stats_sync_equals_centralized_on_pooled_data(arch, pruner_name, pattern):
    pruner = get_pruner(pruner_name)
    site_ids = [random_windows(3, 16, seed=s) for s in range(3)]
    central = tiny_model(arch)
    prune_model_(central, torch.cat(site_ids), pruner, 0.5, parse_pattern(pattern), 4, False)
    federated = _stats_sync(tiny_model(arch), site_ids, pruner, 0.5, parse_pattern(pattern))
    expected, got = _weights(central), _weights(federated)
    for key in expected:
        assert torch.equal(expected[key] != 0, got[key] != 0), key  # identical masks
        assert torch.allclose(expected[key], got[key], atol=1e-5, rtol=1e-4), key


@pytest.mark.parametrize("pruner_name", ["wanda", "sparsegpt"])
def test_bfloat16_stats_sync_equals_centralized(pruner_name):
    """The bfloat16 path (block forwards in bfloat16, statistics in float32/64) stays exact."""
    pruner, pattern = get_pruner(pruner_name), parse_pattern("unstructured")
    site_ids = [random_windows(3, 16, seed=s) for s in range(3)]
    central = tiny_model("llama").to(torch.bfloat16)
    prune_model_(central, torch.cat(site_ids), pruner, 0.5, pattern, 4, False)
    federated = _stats_sync(tiny_model("llama").to(torch.bfloat16), site_ids, pruner, 0.5, pattern)
    expected, got = _weights(central), _weights(federated)
    for key in expected:
        assert expected[key].dtype == torch.bfloat16
        assert torch.equal(expected[key], got[key]), key
        assert (expected[key] == 0).float().mean().item() == pytest.approx(0.5, abs=0.02), key


def test_mask_vote_one_site_equals_local_pruning():
    pruner, pattern = get_pruner("wanda"), parse_pattern("unstructured")
    ids = random_windows(4, 16)
    model = tiny_model("llama")
    masks = local_masks(model, ids, pruner, 0.5, pattern, 2)
    local = tiny_model("llama")
    prune_model_(local, ids, pruner, 0.5, pattern, 2, False)
    _, blocks = find_blocks(model)
    for b in range(len(blocks)):
        block_masks = {n.split(".", 1)[1]: m for n, m in masks.items() if n.startswith(f"{b}.")}
        vote_block_(model, b, [block_masks], 0.5, pattern, "row", scaling=True, seed=0)
    expected, got = _weights(local), _weights(model)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_mask_vote_sync_one_site_equals_local_pruning():
    pruner, pattern = get_pruner("wanda"), parse_pattern("2:4")
    ids = random_windows(4, 16)
    model, local = tiny_model("qwen2"), tiny_model("qwen2")
    prune_model_(local, ids, pruner, 0.5, pattern, 2, False)
    site_model = copy.deepcopy(model)
    state = start_site(site_model, ids, 2)
    _, blocks = find_blocks(model)
    for b in range(len(blocks)):
        masks = site_block_masks(site_model, state, b, pruner, 0.5, pattern)
        _, weights = vote_block_(model, b, [masks], 0.5, pattern, "row", scaling=False, seed=0)
        advance_site_(site_model, state, b, WeightEdit(weights))
    expected, got = _weights(local), _weights(model)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
