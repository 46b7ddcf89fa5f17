"""``model.offload=true`` through the jobs: centralized and stats_sync (server and real site tasks in this
process) give exactly what offload=false gives; other protocols and bad values fail before any work."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from cli.main import job_of
from fedprune.config import ConfigError
from fedprune.models import find_blocks
from fedprune.offload import INDEX_FILE, OffloadedBlocks
from fedprune.protocols import site_state
from fedprune.protocols.catalog import validate
from fedprune.protocols.messages import SiteJob
from fedprune.protocols.tasks import in_process_launcher

FED = ["federation.num_clients=3", "federation.min_clients=3", "data.calib_windows=12"]
SAME = ("ppl_dense", "ppl_pruned", "sparsity_actual", "pruned_weights", "calib_tokens", "eval_tokens")


def _run(make_cfg, out, *overrides):
    job = job_of(make_cfg(*FED, *overrides))
    unit = validate(job)
    return unit.run(job, out, in_process_launcher(3, 3))


def _state(folder):
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def _assert_same_runs(tmp_path, memory, offload):
    assert {k: memory[k] for k in SAME} == {k: offload[k] for k in SAME}
    assert json.loads((tmp_path / "m" / "sparsity.json").read_text()) == json.loads(
        (tmp_path / "o" / "sparsity.json").read_text()
    )
    want, got = _state(tmp_path / "m" / "model"), _state(tmp_path / "o" / "model")
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    assert (tmp_path / "o" / "model" / INDEX_FILE).is_file()
    assert not list((tmp_path / "o").glob(".model.*"))  # no temporary folder left


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_centralized_offload_equals_in_memory(make_cfg, tmp_path, pruner):
    memory = _run(make_cfg, tmp_path / "m", "protocol=centralized", f"pruner={pruner}")
    offload = _run(make_cfg, tmp_path / "o", "protocol=centralized", f"pruner={pruner}", "model.offload=true")
    _assert_same_runs(tmp_path, memory, offload)


@pytest.mark.parametrize(
    "protocol,pruner", [("stats_sync", "wanda"), ("stats_sync", "sparsegpt"), ("mask_vote_sync", "wanda")]
)
def test_layer_sync_offload_equals_in_memory(make_cfg, tmp_path, protocol, pruner):
    memory = _run(make_cfg, tmp_path / "m", f"protocol={protocol}", f"pruner={pruner}")
    offload = _run(make_cfg, tmp_path / "o", f"protocol={protocol}", f"pruner={pruner}", "model.offload=true")
    _assert_same_runs(tmp_path, memory, offload)
    assert (
        offload["rounds"] == memory["rounds"]
        and offload["bytes_up_per_client"] == memory["bytes_up_per_client"]
    )
    # the sites' shared dense model was offloaded too, and every task released its block
    (blocks,) = site_state._MODELS.values()
    assert isinstance(blocks, OffloadedBlocks)
    assert all(p.is_meta for p in find_blocks(blocks.model)[1].parameters())


def test_offload_without_saving_writes_no_model(make_cfg, tmp_path):
    metrics = _run(make_cfg, tmp_path, "protocol=centralized", "model.offload=true", "save_model=false")
    assert metrics["ppl_pruned"] > 0
    assert not (tmp_path / "model").exists() and not list(tmp_path.glob(".model.*"))
    assert (tmp_path / "metrics.json").is_file()


@pytest.mark.parametrize("protocol", ["local", "mask_vote"])
def test_protocols_without_offload_refuse_it_before_any_work(make_cfg, tmp_path, protocol):
    with pytest.raises(ConfigError, match=r"'model.offload'.*centralized or mask_vote_sync or stats_sync"):
        _run(make_cfg, tmp_path, f"protocol={protocol}", "model.offload=true")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.offload=3"],
        ["model.offload=yes"],
        ["protocol=centralized", "model.offload=true", "device=cuda"],
    ],
)
def test_bad_offload_settings_name_the_key(make_cfg, overrides):
    with pytest.raises(ConfigError, match="'model.offload'"):
        validate(job_of(make_cfg(*overrides)))


def test_offload_defaults_to_false_and_travels_to_sites_only_when_set(make_cfg):
    job = job_of(make_cfg())
    assert job.model.offload is False
    assert "offload" not in SiteJob.from_job(job, "k").to_record()
    site_job = SiteJob.from_job(job_of(make_cfg("model.offload=true")), "k")
    record = site_job.to_record()
    assert record["offload"] is True and SiteJob.from_record(record) == site_job
