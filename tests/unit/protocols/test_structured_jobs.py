"""pattern=structured through the real jobs (site tasks in process): stats_sync equals centralized
(identical kept units, equal weights), plain and under secure aggregation; refusals name the key."""

import json

import pytest
import torch

from cli.main import job_of
from fedprune import load_pruned
from fedprune.config import ConfigError
from fedprune.protocols.catalog import validate
from fedprune.protocols.tasks import in_process_launcher

STRUCTURE = ["pattern=structured", "structured.ffn=0.5", "structured.heads=0.5", "data.calib_windows=12"]
SITES = ["federation.num_clients=3", "federation.min_clients=3"]


def _run(make_cfg, folder, *overrides):
    job = job_of(make_cfg(*STRUCTURE, *SITES, *overrides))
    return validate(job).run(job, folder, in_process_launcher(3, 3))


WAYS = {
    "centralized": ["protocol=centralized"],
    "plain": ["protocol=stats_sync"],
    "secure": ["protocol=stats_sync", "privacy=secagg", "privacy.threshold=2", "privacy.token_bound=100"],
}


def _three_ways(make_cfg, folder, *overrides):
    """The same job centralized, through stats_sync in the clear and under secure aggregation."""
    return {name: _run(make_cfg, folder / name, *overrides, *extra) for name, extra in WAYS.items()}


def _state(folder):
    return load_pruned(folder / "model").state_dict()


@pytest.mark.parametrize("pruner", ["wanda", "variance", "sparsegpt", "obs"])
def test_stats_sync_equals_centralized(pruner, make_cfg, tmp_path):
    runs = _three_ways(make_cfg, tmp_path, f"pruner={pruner}")
    expected = _state(tmp_path / "centralized")
    for name in ("plain", "secure"):
        got = _state(tmp_path / name)
        assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in expected.items()}, name
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-4, msg=f"{name} {key}")
        shapes = json.loads((tmp_path / name / "model" / "fedprune_structure.json").read_text())["layers"]
        assert (
            shapes
            == json.loads((tmp_path / "centralized" / "model" / "fedprune_structure.json").read_text())[
                "layers"
            ]
        )
        assert runs[name]["ppl_pruned"] == pytest.approx(runs["centralized"]["ppl_pruned"], rel=1e-3)
        assert runs[name]["calib_tokens"] == runs["centralized"]["calib_tokens"]
    metrics = runs["centralized"]
    assert metrics["ffn_removed"] == 0.5 and metrics["heads_removed"] == 0.5
    assert metrics["params_pruned"] < metrics["params_dense"]
    assert runs["secure"]["privacy"] == "secagg" and not runs["secure"]["rejected"]


def test_depth_pruning_in_stats_sync_equals_centralized(make_cfg, tmp_path):
    depth = ["pruner=wanda", "structured.heads=0", "structured.blocks=1", "structured.attention=1"]
    runs = _three_ways(make_cfg, tmp_path, *depth)
    expected = _state(tmp_path / "centralized")
    assert runs["centralized"]["blocks_removed"] == 1 and runs["centralized"]["attention_removed"] == 1
    for name in ("plain", "secure"):
        got = _state(tmp_path / name)
        assert sorted(got) == sorted(expected), name
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-4, msg=f"{name} {key}")
        assert runs[name]["ppl_pruned"] == pytest.approx(runs["centralized"]["ppl_pruned"], rel=1e-3)
        assert not runs[name]["rejected"]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["structured.heads=0.3"], "structured.heads"),  # 2 groups: 0 or 0.5
        (["structured.ffn=0", "structured.heads=0"], "structured"),
        (["structured.ffn=1.0"], "structured.ffn"),
        (["protocol=hidenseek"], "pattern"),
        (["structured.blocks=2"], "structured.blocks"),  # the tiny model has 2 blocks: one must stay
        (["structured.blocks=1", "structured.attention=2"], "structured.attention"),
        (["pruner=gatenorm"], "structured"),  # gatenorm ranks attention sublayers only
        (
            [
                "structured.blocks=1",
                "protocol=stats_sync",
                "privacy=secagg_dp",
                "privacy.epsilon=8",
                "privacy.delta=1e-5",
            ],
            "privacy.name",
        ),
        (["ignore=[mlp.down_proj]"], "ignore"),
    ],
)
def test_bad_structured_config_names_the_key(overrides, key, make_cfg):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        validate(job_of(make_cfg(*STRUCTURE, *overrides)))


def test_head_error_names_the_valid_fractions(make_cfg):
    with pytest.raises(ConfigError, match=r"valid: 0, 0\.5 \(nearest: 0\.5\)"):
        validate(job_of(make_cfg(*STRUCTURE, "structured.heads=0.4")))
