"""Real Flower simulations (Ray backend) of 3 sites on a tiny Llama with a tiny corpus."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

import fedprune.protocols.llm_site as real
from cli.main import job_of, run
from cli.revote import revote
from clients.client_app import build_app
from fedprune.protocols.catalog import SITE_TASKS, validate
from fedprune.protocols.federation import FederationError
from fedprune.protocols.tasks import in_process_launcher

pytestmark = pytest.mark.integration

FED = ["federation.num_clients=3", "federation.min_clients=2", "data.calib_windows=12"]


def _weights(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    return {n: p.detach() for n, p in model.named_parameters() if n.endswith("proj.weight")}


def test_stats_sync_sparsegpt_equals_centralized(make_cfg, tmp_path):
    central = run(make_cfg("pruner=sparsegpt", "protocol=centralized", *FED), tmp_path / "c")
    federated = run(make_cfg("pruner=sparsegpt", "protocol=stats_sync", *FED), tmp_path / "f")
    assert federated["num_clients"] == 3 and federated["calib_tokens"] == central["calib_tokens"]
    assert federated["rounds"] == 1 + 2 + 1  # start, one per block, finish
    assert federated["bytes_up_per_client"] > 0 and federated["bytes_down_per_client"] > 0
    assert 0 < federated["prune_cpu_s"] and 0 < federated["prune_s"] < federated["wall_s"]
    expected, got = _weights(tmp_path / "c" / "model"), _weights(tmp_path / "f" / "model")
    for name in expected:
        assert torch.equal(expected[name] == 0, got[name] == 0), name
        assert torch.allclose(expected[name], got[name], atol=1e-5, rtol=1e-4), name
    assert federated["ppl_pruned"] == pytest.approx(central["ppl_pruned"], rel=1e-4)


@pytest.mark.parametrize(
    "recipe",
    [
        ["pruner=wanda", "allocation=owl", "owl.m=2", "owl.lambda=0.2", "sparsity=0.6"],
        [
            "pruner=admm",
            "pruner.params.iterations=6",
            "pruner.params.gradual=4",
            "pattern=2:4",
            "sparsity=null",
        ],
    ],
    ids=["wanda+owl", "admm-2:4"],
)
def test_recipe_stats_sync_in_flower_equals_centralized(make_cfg, tmp_path, recipe):
    """Recipes beyond uniform SparseGPT (OWL's extra sum of the dense Σx²; ADMM's reconstruction from the
    summed Σxxᵀ), in a real Flower simulation."""
    central = run(make_cfg("protocol=centralized", *recipe, *FED), tmp_path / "c")
    federated = run(make_cfg("protocol=stats_sync", *recipe, *FED), tmp_path / "f")
    assert federated["num_clients"] == 3 and federated["calib_tokens"] == central["calib_tokens"]
    assert federated.get("block_sparsity") == pytest.approx(central.get("block_sparsity"), abs=1e-12)
    expected, got = _weights(tmp_path / "c" / "model"), _weights(tmp_path / "f" / "model")
    for name in expected:
        assert torch.equal(expected[name] == 0, got[name] == 0), name
        assert torch.allclose(expected[name], got[name], atol=1e-5, rtol=1e-4), name
    assert federated["ppl_pruned"] == pytest.approx(central["ppl_pruned"], rel=1e-4)


def test_structured_stats_sync_in_flower_equals_centralized(make_cfg, tmp_path):
    """pattern=structured with a removed block, in a real Flower simulation: a physically smaller model,
    the same tensors as centralized pruning on the pooled windows."""
    from fedprune import load_pruned

    shape = ["pattern=structured", "structured.ffn=0.5", "structured.heads=0.5", "structured.blocks=1"]
    central = run(make_cfg("pruner=sparsegpt", "protocol=centralized", *shape, *FED), tmp_path / "c")
    federated = run(make_cfg("pruner=sparsegpt", "protocol=stats_sync", *shape, *FED), tmp_path / "f")
    assert federated["num_clients"] == 3 and federated["blocks_removed"] == 1
    assert federated["rounds"] == 1 + 1 + 1 + 1  # start, influence, the one block left, finish
    assert federated["params_pruned"] == central["params_pruned"] < central["params_dense"]
    want = load_pruned(tmp_path / "c" / "model").state_dict()
    got = load_pruned(tmp_path / "f" / "model").state_dict()
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)
    assert federated["ppl_pruned"] == pytest.approx(central["ppl_pruned"], rel=1e-4)


def test_stats_sync_with_offloaded_blocks_equals_in_memory(make_cfg, tmp_path):
    """model.offload=true in Flower: server and sites (Ray actors) load one block at a time."""
    job = job_of(make_cfg("pruner=wanda", "protocol=stats_sync", *FED))
    memory = validate(job).run(job, tmp_path / "m", in_process_launcher(3, 2))
    offload = run(make_cfg("pruner=wanda", "protocol=stats_sync", "model.offload=true", *FED), tmp_path / "o")
    assert offload["num_clients"] == 3 and offload["ppl_pruned"] == memory["ppl_pruned"]
    want = AutoModelForCausalLM.from_pretrained(tmp_path / "m" / "model").state_dict()
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "model").state_dict()
    assert set(got) == set(want) and all(torch.equal(got[name], want[name]) for name in want)


def test_mask_vote_one_shot_uploads_one_bit_per_weight(make_cfg, tmp_path):
    cfg = make_cfg(
        "pruner=wanda", "protocol=mask_vote", "protocol.group=row", "protocol.save_votes=true", *FED
    )
    metrics = run(cfg, tmp_path)
    assert metrics["rounds"] == 1 and metrics["num_clients"] == 3
    assert metrics["sparsity_actual"] == pytest.approx(0.5)
    prunable = sum(w.numel() for w in _weights(tmp_path / "model").values())
    # 1 bit per prunable weight, plus a small header per array (name and npy header)
    assert prunable / 8 <= metrics["bytes_up_per_client"] <= prunable / 8 + 14 * 200
    layers = json.loads((tmp_path / "sparsity.json").read_text())
    assert all(v == pytest.approx(0.5) for v in layers.values())
    # the saved vote counts re-voted with the run's own choices give the run's model exactly
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    again = revote(tmp_path, tmp_path / "again", "row", False)
    assert again["ppl_pruned"] == metrics["ppl_pruned"] and again["vote_sites"] == 3
    expected, got = _weights(tmp_path / "model"), _weights(tmp_path / "again" / "model")
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    # another comparison group on the same counts: the same sparsity, a different mask
    column = revote(tmp_path, tmp_path / "column", "column", False)
    assert (
        column["sparsity_actual"] == pytest.approx(0.5)
        and column["bytes_up_per_client"] == metrics["bytes_up_per_client"]
    )
    other = _weights(tmp_path / "column" / "model")
    assert any(not torch.equal(expected[name] == 0, other[name] == 0) for name in expected)


# A client app whose site 0 sends NaN statistics: the server must leave it out and go on.
def _poison(reply):
    first = sorted(k for k in reply.arrays if k.startswith("total."))[0]
    values = reply.arrays[first].copy()
    values[0] = float("nan")
    reply.arrays[first] = values
    return reply


def _bad_stats(site, request):
    reply = SITE_TASKS["train.stats"](site, request)
    return _poison(reply) if site.node_config["partition-id"] == 0 else reply


bad_app = build_app({"query.start": real.start, "query.finish": real.finish, "train.stats": _bad_stats})


def test_malformed_reply_is_left_out(make_cfg, tmp_path):
    metrics = run(make_cfg("pruner=wanda", "protocol=stats_sync", *FED), tmp_path, bad_app)
    assert len(metrics["rejected"]) == 2  # one per block
    assert all("NaN" in r["reason"] for r in metrics["rejected"])
    assert (tmp_path / "metrics.json").exists()
    # what entered the sums: the two other sites (12 windows over 3 sites: 4 each, 16 tokens a window)
    assert metrics["num_clients"] == 2 and metrics["calib_tokens"] == 2 * 4 * 16


def test_too_few_valid_replies_stops_without_output(make_cfg, tmp_path):
    cfg = make_cfg("pruner=wanda", "protocol=stats_sync", *FED[:1], "federation.min_clients=3", FED[2])
    with pytest.raises(FederationError, match="min_clients=3"):
        run(cfg, tmp_path, bad_app)
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "model").exists()
