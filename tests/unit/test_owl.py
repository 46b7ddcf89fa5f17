"""OWL: outlier ratios, block sparsities (spread, order, exact weighted mean, clipping), and the driver's
allocation against a whole-model dense forward computed independently."""

import numpy as np
import pytest
import torch

from fedprune.allocation_rules import OwlRule, get_allocation_rule
from fedprune.masks import parse_pattern
from fedprune.models import find_blocks, find_prunable_layers, get_weight
from fedprune.owl import MAX_SPARSITY, OwlSpec, block_scores, outlier_ratio, owl_sparsities
from fedprune.pruners import get_pruner
from fedprune.sequential import prune_model_
from fedprune.stats import Stats
from tests.tiny_models import ARCHITECTURES, random_windows, tiny_model


def test_outlier_ratio_counts_scores_above_m_times_the_block_mean():
    # mean of all six scores = 18/6 = 3; above 2 * 3 = 6: only the 10
    scores = [torch.tensor([[1.0, 1.0, 1.0]]), torch.tensor([[1.0, 4.0, 10.0]])]
    assert outlier_ratio(scores, 2.0) == pytest.approx(1 / 6)
    assert outlier_ratio(scores, 1.0) == pytest.approx(2 / 6)  # 4 and 10 are above 3


def test_block_scores_are_wanda_scores_from_the_mean_square():
    weight = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    stats = Stats(kind="sq_norm", total=torch.tensor([8.0, 2.0], dtype=torch.float64), count=2)
    (score,) = block_scores({"w": weight}, {"w": stats})
    expected = torch.tensor([[1.0 * 2.0, 2.0 * 1.0], [3.0 * 2.0, 0.5 * 1.0]])  # sqrt(8/2)=2, sqrt(2/2)=1
    assert torch.allclose(score.float(), expected)


def test_sparsities_spread_linearly_around_the_target():
    assert owl_sparsities([0.1, 0.2, 0.3], 0.5, 0.1, [10, 10, 10]) == pytest.approx([0.6, 0.5, 0.4])
    assert owl_sparsities([0.2, 0.2], 0.7, 0.08, [5, 7]) == pytest.approx([0.7, 0.7])  # no spread: uniform


@pytest.mark.parametrize(
    ("sparsity", "lam", "sizes"),
    [
        (0.5, 0.08, [3, 1, 2, 5]),
        (0.7, 0.2, [1, 1, 1, 1]),
        (0.05, 0.2, [4, 1, 1, 2]),
        (0.95, 0.3, [1, 2, 3, 4]),
    ],
)
def test_weighted_mean_is_exact_and_order_follows_ratios(sparsity, lam, sizes):
    ratios = [0.3, 0.01, 0.12, 0.07]
    s = np.array(owl_sparsities(ratios, sparsity, lam, sizes))
    assert ((s >= 0) & (s <= MAX_SPARSITY)).all()
    assert float((s * np.array(sizes)).sum() / sum(sizes)) == pytest.approx(sparsity, abs=1e-12)
    order = np.argsort(ratios)  # more outliers -> lower (or equal, where clipped) sparsity
    assert (np.diff(s[order]) <= 1e-12).all()
    assert s.max() - s.min() <= 2 * lam + 1e-12


def test_clipping_keeps_the_mean():
    s = owl_sparsities([1.0, 0.0, 0.0], 0.02, 0.3, [1, 1, 1])  # raw [-0.28, 0.32, 0.32] + shift
    assert s[0] == 0.0 and s[1] == pytest.approx(0.03) and s[2] == pytest.approx(0.03)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="owl.m"):
        OwlSpec(m=0)
    with pytest.raises(ValueError, match="owl.lambda"):
        OwlSpec(lam=0.6)
    with pytest.raises(ValueError, match="sparsity"):
        owl_sparsities([0.1, 0.2], 0.995, 0.1, [1, 1])
    with pytest.raises(KeyError, match="known"):
        get_allocation_rule("erk")


def _dense_sq_norms(model, input_ids):
    """Σx² and token count of every prunable layer's input, from ONE forward of the whole dense model."""
    blocks_name, blocks = find_blocks(model)
    sums, handles = {}, []
    for index, block in enumerate(blocks):
        for name, layer in find_prunable_layers(block).items():
            key = (index, name)

            def hook(_m, args, key=key):
                x = args[0].double().reshape(-1, args[0].shape[-1])
                total, count = sums.get(key, (0.0, 0))
                sums[key] = (total + (x * x).sum(0), count + x.shape[0])

            handles.append(layer.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=input_ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return sums


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("pruner_name", ["wanda", "sparsegpt"])
def test_driver_allocation_equals_an_independent_owl_computation(arch, pruner_name):
    model = tiny_model(arch)
    ids = random_windows(6, 12)
    sums = _dense_sq_norms(model, ids)
    _, blocks = find_blocks(model)
    spec = OwlSpec(m=2.0, lam=0.1)
    ratios, sizes = [], []
    for index, block in enumerate(blocks):
        flat = []
        for name, layer in find_prunable_layers(block).items():
            total, count = sums[(index, name)]
            w = get_weight(layer).double().abs()
            flat.append((w * (total / count).sqrt()).reshape(-1).numpy())
        flat = np.concatenate(flat)
        ratios.append(float((flat > spec.m * flat.mean()).mean()))
        sizes.append(flat.size)
    r = np.array(ratios)
    expected = 0.6 + spec.lam - 2 * spec.lam * (r - r.min()) / (r.max() - r.min())
    expected = expected - (expected * sizes).sum() / sum(sizes) + 0.6

    report = prune_model_(
        model,
        ids,
        get_pruner(pruner_name),
        0.6,
        parse_pattern("unstructured"),
        batch_size=4,
        progress=False,
        allocation=OwlRule(spec),
    )
    assert report.allocation.block_score == pytest.approx(ratios, abs=1e-12)
    assert report.allocation.block_sparsity == pytest.approx(expected.tolist(), abs=1e-9)
    blocks_name = find_blocks(model)[0]
    for index, block in enumerate(blocks):
        for name in find_prunable_layers(block):
            realised = report.layer_sparsity[f"{blocks_name}.{index}.{name}"]
            in_features = get_weight(find_prunable_layers(block)[name]).shape[1]
            assert abs(realised - expected[index]) <= 1.0 / in_features + 1e-9
