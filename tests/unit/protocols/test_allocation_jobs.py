"""``allocation=owl`` through whole jobs: stats_sync (plain and secure) equals centralized, with one extra
sum of every dense block's Σx² before the first block; protocols without it refuse the key."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from cli.main import job_of
from fedprune.config import ConfigError
from fedprune.protocols.catalog import validate
from fedprune.protocols.tasks import in_process_launcher

FED = ["federation.num_clients=3", "federation.min_clients=3", "data.calib_windows=12", "allocation=owl"]
OWL = ["owl.m=2.0", "owl.lambda=0.2", "sparsity=0.6"]


def _run(make_cfg, tmp_path, *overrides):
    job = job_of(make_cfg(*FED, *OWL, *overrides))
    unit = validate(job)
    return unit.run(job, tmp_path, in_process_launcher(3, 3))


def _weights(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    return {n: p.detach() for n, p in model.named_parameters() if n.endswith("proj.weight")}


@pytest.mark.parametrize(
    ("pruner", "privacy"), [("wanda", "none"), ("sparsegpt", "none"), ("sparsegpt", "secagg")]
)
def test_owl_stats_sync_equals_centralized(make_cfg, tmp_path, pruner, privacy):
    central = _run(make_cfg, tmp_path / "c", "protocol=centralized", f"pruner={pruner}")
    federated = _run(
        make_cfg, tmp_path / "f", "protocol=stats_sync", f"pruner={pruner}", f"privacy={privacy}"
    )
    assert federated["allocation"] == central["allocation"] == "owl"
    assert federated["block_allocation_score"] == central["block_allocation_score"]
    assert federated["block_sparsity"] == pytest.approx(central["block_sparsity"], abs=1e-12)
    spread = central["block_sparsity"]
    assert max(spread) - min(spread) > 0.05  # the tiny model's two blocks do get different sparsities
    assert (
        federated["allocation_sites"] == sorted(federated["allocation_sites"])
        and len(federated["allocation_sites"]) == 3
    )
    if privacy == "none":
        assert federated["rounds"] == 1 + 1 + 2 + 1  # start, the dense sum, two blocks, finish
    expected, got = _weights(tmp_path / "c" / "model"), _weights(tmp_path / "f" / "model")
    for name in expected:
        assert torch.equal(expected[name] == 0, got[name] == 0), name
        assert torch.allclose(expected[name], got[name], atol=1e-5, rtol=1e-4), name
    layers = json.loads((tmp_path / "f" / "sparsity.json").read_text())
    for block, target in enumerate(spread):  # each layer at its block's sparsity, up to one weight per row
        fractions = [v for k, v in layers.items() if k.startswith(f"model.layers.{block}.")]
        assert len(fractions) == 7 and all(abs(f - target) <= 1 / 32 + 1e-9 for f in fractions)


@pytest.mark.parametrize(
    "overrides",
    [
        ["protocol=hidenseek"],
        ["protocol=centralized", "model.offload=true"],
    ],
)
def test_unsupported_combinations_name_the_key(make_cfg, overrides):
    with pytest.raises(ConfigError, match="'allocation'"):
        validate(job_of(make_cfg(*FED, *OWL, *overrides)))


def test_owl_mask_vote_sync_with_one_site_equals_centralized(make_cfg, tmp_path):
    """One site: its own masks at the block sparsities of the summed (its own) Σx² are centralized's."""

    def one_site(out, *overrides):
        job = job_of(make_cfg(*FED, *OWL, "federation.num_clients=1", "federation.min_clients=1", *overrides))
        return validate(job).run(job, out, in_process_launcher(1, 1))

    central = one_site(tmp_path / "c", "protocol=centralized")
    voted = one_site(tmp_path / "v", "protocol=mask_vote_sync", "protocol.group=row")  # wanda compares rows
    assert voted["block_sparsity"] == pytest.approx(central["block_sparsity"], abs=1e-12)
    assert voted["rounds"] == 1 + 1 + 2 + 1  # start, the dense sum, two blocks, finish
    expected, got = _weights(tmp_path / "c" / "model"), _weights(tmp_path / "v" / "model")
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


@pytest.mark.parametrize("privacy", ["none", "secagg"])
def test_owl_mask_vote_sync_votes_at_the_pooled_block_sparsities(make_cfg, tmp_path, privacy):
    central = _run(make_cfg, tmp_path / "c", "protocol=centralized")
    voted = _run(make_cfg, tmp_path / "v", "protocol=mask_vote_sync", f"privacy={privacy}")
    assert voted["block_sparsity"] == pytest.approx(central["block_sparsity"], abs=1e-12)
    layers = json.loads((tmp_path / "v" / "sparsity.json").read_text())
    for block, target in enumerate(central["block_sparsity"]):
        fractions = [v for k, v in layers.items() if k.startswith(f"model.layers.{block}.")]
        assert len(fractions) == 7 and all(abs(f - target) <= 1 / 32 + 1e-9 for f in fractions)


def test_owl_mask_vote_with_one_site_equals_centralized(make_cfg, tmp_path):
    """One-shot: the site applies OWL on its own data; the server votes each layer at the sites' mean
    sparsity (from the keep counts), so one site's model is centralized's."""

    def one_site(out, *overrides):
        job = job_of(make_cfg(*FED, *OWL, "federation.num_clients=1", "federation.min_clients=1", *overrides))
        return validate(job).run(job, out, in_process_launcher(1, 1))

    one_site(tmp_path / "c", "protocol=centralized")
    one_site(tmp_path / "v", "protocol=mask_vote", "protocol.group=row")
    expected, got = _weights(tmp_path / "c" / "model"), _weights(tmp_path / "v" / "model")
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    layers = json.loads((tmp_path / "v" / "sparsity.json").read_text())
    assert abs(layers["model.layers.0.mlp.down_proj"] - layers["model.layers.1.mlp.down_proj"]) > 0.05


def test_owl_local_gives_each_site_its_own_block_sparsities(make_cfg, tmp_path):
    metrics = _run(make_cfg, tmp_path, "protocol=local")
    layers = json.loads((tmp_path / "sparsity.json").read_text())
    assert metrics["allocation"] == "owl"
    assert abs(layers["model.layers.0.mlp.down_proj"] - layers["model.layers.1.mlp.down_proj"]) > 0.05


def test_owl_with_dp_runs_and_counts_its_dense_release(make_cfg, tmp_path):
    """``secagg_dp``: the dense sum is noised like the block sums and counted (more noise for the same
    epsilon); the noisy scores still give block sparsities whose weighted mean is the target."""
    dp = [
        "protocol=stats_sync",
        "pruner=wanda",
        "privacy=secagg_dp",
        "privacy.epsilon=8",
        "privacy.delta=1e-5",
    ]
    metrics = _run(make_cfg, tmp_path, *dp)
    assert metrics["dp_epsilon"] == pytest.approx(8.0) and metrics["allocation_sites"] == [100, 101, 102]
    uniform = _run(make_cfg, tmp_path / "u", *dp, "allocation=uniform")
    assert metrics["dp_sigma"] == pytest.approx(uniform["dp_sigma"] * 2**0.5)  # 2 x 7 block slots + 14
    spread = metrics["block_sparsity"]  # two blocks of equal size: their mean is the target
    assert sum(spread) / 2 == pytest.approx(0.6, abs=1e-9) and max(spread) - min(spread) > 0.05
    assert abs(metrics["sparsity_actual"] - 0.6) <= 1 / 32  # each row rounds to whole weights
