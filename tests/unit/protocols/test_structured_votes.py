"""pattern=structured through the voting protocols and local (site tasks in process): sites vote on kept
units; one site equals its own local structured pruning; three sites give a loadable, smaller model that
matches the summed votes; secure aggregation gives the same model; refusals name the key."""

import json

import pytest
import torch
from safetensors.torch import load_file

from cli.main import job_of
from cli.revote import revote
from fedprune import load_pruned
from fedprune.config import ConfigError
from fedprune.models import find_blocks
from fedprune.protocols.catalog import validate
from fedprune.protocols.tasks import in_process_launcher
from fedprune.structured.vote import select_units

STRUCTURE = ["pattern=structured", "structured.ffn=0.5", "structured.heads=0.5", "data.calib_windows=12"]


def _run(make_cfg, folder, sites, *overrides):
    fed = [f"federation.num_clients={sites}", f"federation.min_clients={sites}"]
    job = job_of(make_cfg(*STRUCTURE, *fed, *overrides))
    return validate(job).run(job, folder, in_process_launcher(sites, sites))


def _state(folder):
    return load_pruned(folder / "model").state_dict()


def _kept_columns(dense, pruned):
    """The dense column index of each column of ``pruned`` (the kept indices, read off the weights)."""
    matches = (pruned.T.unsqueeze(1) == dense.T.unsqueeze(0)).all(dim=2)  # (kept, dense)
    assert bool((matches.sum(dim=1) == 1).all())
    return matches.int().argmax(dim=1)


def _kept(folder, dense):
    """Per block, the kept FFN neurons and query-head columns of the saved model."""
    model = load_pruned(folder / "model")
    out = {}
    for b, block in enumerate(find_blocks(model)[1]):
        dense_block = find_blocks(dense)[1][b]
        out[b] = {
            "ffn": _kept_columns(dense_block.mlp.down_proj.weight, block.mlp.down_proj.weight),
            "heads": _kept_columns(dense_block.self_attn.o_proj.weight, block.self_attn.o_proj.weight),
        }
    return out


def _assert_same_model(got, expected, label):
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in expected.items()}, label
    for key in expected:
        assert torch.equal(got[key], expected[key]), f"{label}: {key}"


@pytest.mark.parametrize("protocol", ["mask_vote_sync", "mask_vote"])
def test_one_site_votes_give_its_own_local_structured_pruning(protocol, make_cfg, tiny_assets, tmp_path):
    """wanda has no weight update: the global edit of one site's votes is that site's own edit."""
    local = _run(make_cfg, tmp_path / "local", 1, "protocol=local", "pruner=wanda")
    voted = _run(make_cfg, tmp_path / "voted", 1, f"protocol={protocol}", "pruner=wanda")
    dense = load_pruned(tiny_assets["model"])
    expected, got = _kept(tmp_path / "local", dense), _kept(tmp_path / "voted", dense)
    for block in expected:
        for granularity in ("ffn", "heads"):
            assert torch.equal(got[block][granularity], expected[block][granularity]), (block, granularity)
    assert len(expected[0]["ffn"]) == 32 and len(expected[0]["heads"]) == 16  # 1 of 2 groups: 2 heads x 8
    _assert_same_model(_state(tmp_path / "voted"), _state(tmp_path / "local"), protocol)
    assert voted["ppl_pruned"] == pytest.approx(local["ppl_pruned"], rel=1e-6)
    assert voted["calib_tokens"] == local["calib_tokens"] == 12 * 16


@pytest.mark.parametrize("protocol", ["mask_vote_sync", "mask_vote", "local"])
def test_three_sites_give_a_smaller_model_with_the_realised_fractions(protocol, make_cfg, tmp_path):
    extra = ["protocol.save_votes=true"] if protocol == "mask_vote" else []
    metrics = _run(make_cfg, tmp_path, 3, f"protocol={protocol}", "pruner=wanda", *extra)
    model = load_pruned(tmp_path / "model")
    assert sum(p.numel() for p in model.parameters()) == metrics["params_pruned"] < metrics["params_dense"]
    assert metrics["ffn_removed"] == 0.5 and metrics["heads_removed"] == 0.5
    assert metrics["structured_units_per_block"] == {"ffn": 32, "heads": 1}
    assert metrics["num_clients"] == 3 and metrics["loads_with_from_pretrained"] is True
    for block in find_blocks(model)[1]:
        assert block.mlp.down_proj.in_features == 32 and block.self_attn.k_proj.out_features == 8
        assert block.self_attn.q_proj.out_features == block.self_attn.o_proj.in_features == 16
    layers = json.loads((tmp_path / "sparsity.json").read_text())
    assert len(layers) == 2 * 7 and all(f == 0.5 for f in layers.values())
    assert json.loads((tmp_path / "model" / "fedprune_structure.json").read_text())["layers"]
    if protocol == "local":
        assert len(metrics["ppl_per_client"]) == 3
    else:
        assert not metrics["rejected"] and metrics["bytes_up_per_client"] > 0


def test_one_shot_votes_are_saved_per_unit_and_the_model_keeps_the_most_voted(
    make_cfg, tiny_assets, tmp_path
):
    metrics = _run(make_cfg, tmp_path, 3, "protocol=mask_vote", "pruner=wanda", "protocol.save_votes=true")
    votes = load_file(str(tmp_path / "votes.safetensors"))
    assert {k: tuple(v.shape) for k, v in votes.items()} == {
        "0.ffn": (64,),
        "0.heads": (2,),
        "1.ffn": (64,),
        "1.heads": (2,),
    }
    assert metrics["vote_sites"] == 3
    for block in (0, 1):
        assert int(votes[f"{block}.ffn"].sum()) == 3 * 32 and int(votes[f"{block}.heads"].sum()) == 3 * 1
        assert int(votes[f"{block}.ffn"].max()) <= 3
    kept = _kept(tmp_path, load_pruned(tiny_assets["model"]))
    for block in (0, 1):
        neurons = select_units(votes[f"{block}.ffn"], 32)
        assert torch.equal(kept[block]["ffn"], neurons)
        (group,) = select_units(votes[f"{block}.heads"], 1).tolist()
        assert kept[block]["heads"].tolist() == list(range(16 * group, 16 * group + 16))
    with pytest.raises(SystemExit, match="pattern=structured run"):
        revote(tmp_path, tmp_path / "revoted", "row", False)


@pytest.mark.parametrize("protocol", ["mask_vote_sync", "mask_vote"])
def test_secure_vote_sums_give_the_same_model(protocol, make_cfg, tmp_path):
    plain = _run(make_cfg, tmp_path / "plain", 3, f"protocol={protocol}", "pruner=wanda")
    secure = _run(
        make_cfg,
        tmp_path / "secure",
        3,
        f"protocol={protocol}",
        "pruner=wanda",
        "privacy=secagg",
        "privacy.threshold=2",
    )
    _assert_same_model(_state(tmp_path / "secure"), _state(tmp_path / "plain"), protocol)
    assert secure["privacy"] == "secagg" and not secure["rejected"] and secure["num_clients"] == 3
    assert secure["ppl_pruned"] == plain["ppl_pruned"]


@pytest.mark.parametrize("protocol", ["mask_vote", "mask_vote_sync"])
@pytest.mark.parametrize(
    ("override", "key"),
    [("protocol.group=row", "protocol.group"), ("protocol.scaling=true", "protocol.scaling")],
)
def test_vote_options_that_do_not_apply_to_units_are_refused(protocol, override, key, make_cfg):
    with pytest.raises(ConfigError, match=f"config key '{key}'.*pattern=structured"):
        validate(job_of(make_cfg(*STRUCTURE, f"protocol={protocol}", override)))
