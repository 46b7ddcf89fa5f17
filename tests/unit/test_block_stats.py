"""BlockStats: groups of layers sharing one input, found once and kept through encode/decode/aggregate."""

import numpy as np
import pytest
import torch

import fedprune.pruners.sparsegpt as sparsegpt
from fedprune.aggregation.block import aggregate_stats
from fedprune.masks import Pattern
from fedprune.models import find_blocks, find_prunable_layers
from fedprune.payload import decode_stats, encode_stats
from fedprune.pruners import get_pruner
from fedprune.sequential import capture_block_inputs, collect_block_stats
from fedprune.stats import BlockStats, as_block_stats, batch_stats, sum_stats
from tests.tiny_models import ARCHITECTURES, random_windows, tiny_model


def _previous_encode_stats(stats):
    """encode_stats before BlockStats: distinct entries found by comparing tensors (the reference)."""
    unique, index = [], []
    for name in sorted(stats):
        s = stats[name]
        found = next(
            (
                i
                for i, u in enumerate(unique)
                if u.count == s.count and u.total.shape == s.total.shape and torch.equal(u.total, s.total)
            ),
            None,
        )
        if found is None:
            unique.append(s)
            found = len(unique) - 1
        index.append(found)
    n = lambda s: s.total.shape[0]  # noqa: E731
    arrays = {
        f"total.{i}": (
            s.total[tuple(torch.triu_indices(n(s), n(s)))] if s.kind == "hessian" else s.total
        ).numpy()
        for i, s in enumerate(unique)
    }
    arrays["count"] = np.array([s.count for s in unique], dtype=np.int64)
    arrays["index"] = np.array(index, dtype=np.int64)
    return arrays


def _assert_same_arrays(got, expected):
    assert list(got) == list(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype and got[key].shape == expected[key].shape, key
        assert got[key].tobytes() == expected[key].tobytes(), key


def _llama_block_stats(kind, windows=4):
    model = tiny_model("llama")
    inputs = capture_block_inputs(model, random_windows(windows, 8), batch_size=2)
    block = find_blocks(model)[1][0]
    return collect_block_stats(block, inputs, kind), list(find_prunable_layers(block))


def test_groups_of_a_tiny_llama_block():
    stats, layers = _llama_block_stats("sq_norm")
    assert isinstance(stats, BlockStats)
    assert stats.groups == [
        ("mlp.down_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
    ]
    assert list(stats) == layers  # iteration in module order, as the plain dict was
    assert stats.index == [0, 1, 1, 2, 3, 2, 2]  # sorted: down gate up k o q v
    for group, s in zip(stats.groups, stats.group_stats, strict=True):
        assert all(stats[name] is s for name in group)
    assert stats.group_of("self_attn.v_proj") == ("self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj")


def test_encode_hand_built_case_equals_previous_implementation():
    torch.manual_seed(1)
    for kind in ("sq_norm", "hessian"):
        qkv, o, gate = (batch_stats(kind, torch.randn(2, 5, n)) for n in (4, 3, 4))
        plain = {"q": qkv, "k": qkv, "v": qkv, "o": o, "gate": gate, "up": gate}
        expected = _previous_encode_stats(plain)
        assert expected["index"].tolist() == [0, 1, 2, 1, 0, 1]  # gate k o q up v
        _assert_same_arrays(encode_stats(plain), expected)
        _assert_same_arrays(encode_stats(as_block_stats(plain)), expected)
        grouped = BlockStats({("q", "k", "v"): qkv, ("o",): o, ("up", "gate"): gate})
        _assert_same_arrays(encode_stats(grouped), expected)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("kind", ["sq_norm", "hessian"])
def test_encode_collected_stats_equals_previous_implementation(arch, kind):
    model = tiny_model(arch)
    inputs = capture_block_inputs(model, random_windows(4, 8), batch_size=2)
    stats = collect_block_stats(find_blocks(model)[1][0], inputs, kind)
    _assert_same_arrays(encode_stats(stats), _previous_encode_stats(dict(stats)))


@pytest.mark.parametrize("kind", ["sq_norm", "hessian"])
def test_decode_and_aggregate_keep_one_stats_object_per_group(kind):
    stats, _ = _llama_block_stats(kind)
    widths = {name: s.total.shape[0] for name, s in stats.items()}
    sites = [decode_stats(encode_stats(stats), kind, widths, max_count=10**6) for _ in range(3)]
    for site in sites:
        assert site.groups == stats.groups
        for name in stats:
            assert torch.equal(site[name].total, stats[name].total) and site[name].count == stats[name].count
    total = aggregate_stats(sites)
    assert total.groups == stats.groups and list(total) == list(sorted(stats))
    for name in stats:
        reference = sum_stats([site[name] for site in sites])  # per layer, as before
        assert torch.equal(total[name].total, reference.total) and total[name].count == reference.count


def test_aggregate_shares_only_what_every_site_shares():
    a, b = batch_stats("sq_norm", torch.ones(2, 3)), batch_stats("sq_norm", torch.ones(2, 3) * 2)
    site1 = {"q": a, "k": a, "v": a}
    site2 = {"q": b, "k": b, "v": batch_stats("sq_norm", torch.ones(2, 3) * 2)}  # v a separate object
    total = aggregate_stats([site1, site2])
    assert total.groups == [("k", "q"), ("v",)]
    assert total["q"] is total["k"] and total["v"] is not total["q"]
    assert torch.equal(total["v"].total, total["q"].total) and total["v"].count == 4


def test_block_stats_rejects_inconsistent_groups():
    s = batch_stats("sq_norm", torch.ones(2, 3))
    with pytest.raises(ValueError, match="two groups"):
        BlockStats({("a", "b"): s, ("b",): s})
    with pytest.raises(ValueError, match="order"):
        BlockStats({("a",): s}, order=["a", "c"])
    assert BlockStats({}) == {} and len(collect_block_stats(None, None, None)) == 0


def test_sparsegpt_factors_once_per_group_through_the_federated_path(monkeypatch):
    stats, layers = _llama_block_stats("hessian")
    widths = {name: s.total.shape[0] for name, s in stats.items()}
    sites = [decode_stats(encode_stats(stats), "hessian", widths, max_count=10**6) for _ in range(2)]
    calls = []
    real = sparsegpt.inverse_hessian_factor
    monkeypatch.setattr(sparsegpt, "inverse_hessian_factor", lambda h: calls.append(1) or real(h))
    pruner = get_pruner("sparsegpt", blocksize=8)
    for source in (stats, aggregate_stats(sites)):
        calls.clear()
        for name in layers:  # module order: q k v o gate up down
            pruner.prune(torch.randn(8, widths[name]), source[name], 0.5, Pattern("unstructured"))
        assert len(calls) == 4  # one factor per group: {q,k,v}, {o}, {gate,up}, {down}
