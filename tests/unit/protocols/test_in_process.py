"""Protocols' server routines with real site tasks in this process (no Flower): the same code a Flower
run executes, so federated equals centralized is checked in seconds, here with layers left dense."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from cli.main import job_of
from fedprune.config import ConfigError
from fedprune.protocols.catalog import validate
from fedprune.protocols.tasks import in_process_launcher

FED = ["federation.num_clients=3", "federation.min_clients=3", "data.calib_windows=12"]


def _run(make_cfg, tmp_path, *overrides):
    job = job_of(make_cfg(*FED, *overrides))
    unit = validate(job)
    return unit.run(job, tmp_path, in_process_launcher(3, 3))


def _weights(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    return {n: p.detach() for n, p in model.named_parameters() if n.endswith("proj.weight")}


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_stats_sync_in_process_equals_centralized_with_ignored_layers(
    make_cfg, tiny_assets, tmp_path, pruner
):
    ignore = "ignore=[*.o_proj]"
    central = _run(make_cfg, tmp_path / "c", "protocol=centralized", f"pruner={pruner}", ignore)
    federated = _run(make_cfg, tmp_path / "f", "protocol=stats_sync", f"pruner={pruner}", ignore)
    assert federated["num_clients"] == 3 and federated["calib_tokens"] == central["calib_tokens"] == 12 * 16
    assert federated["rounds"] == 1 + 2 + 1 and not federated["rejected"]
    dense = {
        n: p.detach()
        for n, p in AutoModelForCausalLM.from_pretrained(tiny_assets["model"]).named_parameters()
    }
    expected, got = _weights(tmp_path / "c" / "model"), _weights(tmp_path / "f" / "model")
    for name in expected:
        if name.endswith("o_proj.weight"):  # left dense on purpose, at both
            assert torch.equal(got[name], dense[name]) and torch.equal(expected[name], dense[name])
            continue
        assert torch.equal(expected[name] == 0, got[name] == 0), name
        assert torch.allclose(expected[name], got[name], atol=1e-5, rtol=1e-4), name
        assert (got[name] == 0).float().mean().item() == pytest.approx(0.5)
    assert federated["ignored_layers"] == [f"model.layers.{b}.self_attn.o_proj.weight" for b in range(2)]
    assert federated["ignored_weights"] == 2 * 32 * 32 and federated["sparsity_actual"] == pytest.approx(0.5)
    assert (
        federated["pruned_weights"] == central["pruned_weights"] == 2 * (32 * 32 + 2 * 16 * 32 + 3 * 64 * 32)
    )  # q, k, v, gate, up, down


@pytest.mark.parametrize("protocol", ["mask_vote", "mask_vote_sync"])
def test_voting_in_process_leaves_ignored_layers_dense(make_cfg, tiny_assets, tmp_path, protocol):
    metrics = _run(
        make_cfg, tmp_path, f"protocol={protocol}", "pruner=wanda", "ignore=[model.layers.1.mlp.*]"
    )
    got = _weights(tmp_path / "model")
    dense = {
        n: p.detach()
        for n, p in AutoModelForCausalLM.from_pretrained(tiny_assets["model"]).named_parameters()
    }
    for name, weight in got.items():
        if name.startswith("model.layers.1.mlp."):
            assert torch.equal(weight, dense[name]), name
        else:
            assert (weight == 0).float().mean().item() == pytest.approx(0.5), name
    assert metrics["num_clients"] == 3 and len(metrics["ignored_layers"]) == 3


def test_an_ignore_pattern_that_matches_nothing_stops_before_pruning(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="'ignore'.*o_prj"):
        _run(make_cfg, tmp_path, "protocol=stats_sync", "pruner=wanda", "ignore=[*.o_prj]")
    assert not (tmp_path / "metrics.json").exists()
