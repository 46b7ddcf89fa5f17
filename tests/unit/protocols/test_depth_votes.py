"""Depth pruning (structured.blocks / structured.attention) where sites vote or prune alone: each site
votes 1 bit per block and per attention sublayer from its own influence sums; the server removes the
least kept. References: hand-made votes, centralized pruning on each site's own windows, plain sums."""

import copy
import json
from collections import Counter

import numpy as np
import pytest
import torch

from cli.main import job_of
from fedprune import load_pruned
from fedprune.masks import parse_pattern
from fedprune.models import find_blocks
from fedprune.payload import decode_masks, encode_masks
from fedprune.protocols.catalog import SITE_TASKS, validate
from fedprune.protocols.federation import Reply
from fedprune.protocols.llm_site import calibration_ids
from fedprune.protocols.messages import BlockTask, SiteJob
from fedprune.protocols.tasks import Site, in_process_launcher
from fedprune.pruners import get_pruner
from fedprune.secure.codec import pack_votes
from fedprune.sequential import prune_model_
from fedprune.site import site_depth_votes, start_site
from fedprune.structured.decide import Structure
from fedprune.structured.depth import ZeroAttention
from fedprune.structured.vote import depth_vote_shapes, fewest_votes, voted_depth_plan
from tests.recording import RecordingTransport
from tests.tiny_models import _configs as tiny_configs
from tests.tiny_models import random_windows

DEPTH = ["pattern=structured", "structured.ffn=0.5", "structured.blocks=1", "structured.attention=1"]
DATA = ["data.calib_windows=12", "pruner=wanda"]
SECAGG = ["privacy=secagg", "privacy.threshold=2"]


def _deep(layers=4):
    cls, config = tiny_configs()["llama"]
    config = copy.deepcopy(config)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    return cls(config).eval()


# --- the server's choice from summed votes -------------------------------------------------------------


def test_fewest_votes_removes_the_least_kept_and_keeps_the_lower_index_on_a_tie():
    assert fewest_votes(torch.tensor([3, 1, 2, 3]), 1) == [1]
    assert fewest_votes(torch.tensor([2, 1, 1, 3]), 1) == [2]  # tie 1-2: block 1 kept
    assert fewest_votes(torch.tensor([3, 2, 2, 2]), 1, exclude=[1]) == [3]
    assert fewest_votes(torch.tensor([3, 2, 2, 2]), 3, exclude=[1]) == [0, 2, 3]  # every candidate
    with pytest.raises(ValueError, match="cannot remove 4 of 3"):
        fewest_votes(torch.tensor([3, 2, 2, 2]), 4, exclude=[1])


def test_hand_made_votes_of_three_sites_give_the_expected_plan():
    model = _deep()
    structure = Structure.for_model(model, 0.5, 0.0, blocks=1, attention=1)
    pruner = get_pruner("wanda")
    # 1 = kept. Blocks: A and C remove block 1, B block 2. Attention: A removes 3, B 1, C 2.
    sites = {
        "A": ([1, 0, 1, 1], [1, 1, 1, 0]),
        "B": ([1, 1, 0, 1], [1, 0, 1, 1]),
        "C": ([1, 0, 1, 1], [1, 1, 0, 1]),
    }
    counts = {
        "blocks": torch.tensor([sum(v[0][i] for v in sites.values()) for i in range(4)]),  # [3, 1, 2, 3]
        "attention": torch.tensor([sum(v[1][i] for v in sites.values()) for i in range(4)]),  # [3, 2, 2, 2]
    }
    plan = voted_depth_plan(structure, counts, model, pruner)
    # block 1 (fewest keep votes) goes; attention among 0, 2, 3: 2 and 3 tie, the lower index stays
    assert plan.blocks == (1,) and plan.attention == (3,)
    with pytest.raises(ValueError, match="depth vote counts for 'attention'"):
        voted_depth_plan(structure, {"blocks": counts["blocks"]}, model, pruner)


@pytest.mark.parametrize(
    ("pruner", "ffn", "blocks", "attention"),
    [("wanda", 0.5, 1, 1), ("wanda", 0.5, 2, 2), ("gatenorm", 0, 0, 2)],
)
def test_one_site_and_identical_sites_vote_centralized_choice(pruner, ffn, blocks, attention):
    model, ids = _deep(), random_windows(6, 16, seed=3)
    method = get_pruner(pruner)
    structure = Structure.for_model(model, ffn, 0.0, blocks, attention)
    centralized = prune_model_(
        copy.deepcopy(model), ids, method, 0.0, parse_pattern("structured"), 4, False, structure=structure
    ).depth
    assert len(centralized.blocks) == blocks and len(centralized.attention) == attention
    votes = site_depth_votes(model, start_site(model, ids, 4), method, structure)
    assert set(votes) == {k.removeprefix("depth.") for k in depth_vote_shapes(structure, method)}
    for sites in (1, 3):
        counts = {kind: sites * vote for kind, vote in votes.items()}
        assert voted_depth_plan(structure, counts, model, method) == centralized, sites
    if pruner == "gatenorm":  # data-free: no vote at all, everyone computes the same choice
        assert votes == {} and depth_vote_shapes(structure, method) == {}


# --- whole jobs, site tasks in process ------------------------------------------------------------------


def _job(make_cfg, sites, *overrides):
    fed = [f"federation.num_clients={sites}", f"federation.min_clients={sites}"]
    return job_of(make_cfg(*DEPTH, *DATA, *fed, *overrides))


def _run(make_cfg, folder, sites, *overrides, log=None, tasks=None):
    job = _job(make_cfg, sites, *overrides)
    inner = in_process_launcher(sites, sites, tasks)

    def launch(server_main):
        def recorded(fed):
            if log is not None:
                fed.transport = RecordingTransport(fed.transport, log)
            server_main(fed)

        inner(recorded)

    return validate(job).run(job, folder, launch)


def _site_choices(make_cfg, sites, *overrides):
    """Reference: each site's own centralized choice on its own windows (the dense model, prune_model_)."""
    job = _job(make_cfg, sites, *overrides)
    site_job = SiteJob.from_job(job, "reference")
    dense = load_pruned(job.model.path)
    structure = Structure.for_model(dense, 0.5, 0.0, 1, 1)
    pruner = get_pruner("wanda")
    plans = []
    for i in range(sites):
        ids = calibration_ids(site_job, Site(100 + i, {"partition-id": i, "num-partitions": sites}))
        model = copy.deepcopy(dense)
        plans.append(
            prune_model_(
                model, ids, pruner, 0.0, parse_pattern("structured"), 4, False, structure=structure
            ).depth
        )
    return dense, plans


def _remaining_block(folder, dense):
    """The saved model's one block and the index of the dense block it came from (its FFN columns are a
    subset of that block's)."""
    (block,) = find_blocks(load_pruned(folder / "model"))[1]
    sources = []
    for index, source in enumerate(find_blocks(dense)[1]):
        columns = block.mlp.down_proj.weight.T.unsqueeze(1) == source.mlp.down_proj.weight.T.unsqueeze(0)
        if bool(columns.all(dim=2).any(dim=1).all()):
            sources.append(index)
    assert len(sources) == 1
    return block, sources[0]


@pytest.mark.parametrize("protocol", ["mask_vote_sync", "mask_vote"])
def test_voted_depth_removes_the_majority_choice_and_loads(protocol, make_cfg, tmp_path):
    metrics = _run(make_cfg, tmp_path, 3, f"protocol={protocol}")
    dense, plans = _site_choices(make_cfg, 3)
    removed = Counter(b for plan in plans for b in plan.blocks).most_common(1)[0][0]
    block, source = _remaining_block(tmp_path, dense)
    assert source == 1 - removed  # the tiny model has 2 blocks: the other one stays
    assert isinstance(block.self_attn, ZeroAttention)  # attention=1: the only block left loses it
    assert block.mlp.down_proj.in_features == 32
    assert metrics["blocks_removed"] == 1 and metrics["attention_removed"] == 1
    assert metrics["depth_sites"] == [100, 101, 102] and metrics["num_clients"] == 3
    assert not metrics["rejected"]
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 1


def test_the_server_follows_the_majority_of_depth_votes(make_cfg, tmp_path):
    """Every site would remove block 0 (see above); two of three are made to vote for block 1 (and block
    0's attention): block 1 goes, block 0 stays without attention."""

    def outvoted(site, request):
        answer = SITE_TASKS["train.masks"](site, request)
        if request.config.get("task") == "influence" and site.node_id in (100, 101):
            votes = {
                "depth.blocks": torch.tensor([[True, False]]),
                "depth.attention": torch.tensor([[False, True]]),
            }
            return Reply(encode_masks(votes), answer.metrics)
        return answer

    metrics = _run(
        make_cfg, tmp_path, 3, "protocol=mask_vote_sync", tasks={**SITE_TASKS, "train.masks": outvoted}
    )
    dense, plans = _site_choices(make_cfg, 3)
    assert all(plan.blocks == (0,) for plan in plans)  # the honest choice, outvoted
    block, source = _remaining_block(tmp_path, dense)
    assert source == 0 and isinstance(block.self_attn, ZeroAttention)
    assert metrics["depth_sites"] == [100, 101, 102]


def test_secure_depth_votes_give_the_plain_model_and_hide_each_site_vote(make_cfg, tmp_path):
    plain_log, secure_log = [], []
    plain = _run(make_cfg, tmp_path / "plain", 3, "protocol=mask_vote_sync", log=plain_log)
    secure = _run(make_cfg, tmp_path / "secure", 3, "protocol=mask_vote_sync", *SECAGG, log=secure_log)
    got, expected = load_pruned(tmp_path / "secure" / "model"), load_pruned(tmp_path / "plain" / "model")
    assert {k: v.shape for k, v in got.state_dict().items()} == {
        k: v.shape for k, v in expected.state_dict().items()
    }
    for key, value in expected.state_dict().items():
        assert torch.equal(got.state_dict()[key], value), key
    assert secure["ppl_pruned"] == plain["ppl_pruned"] and not secure["rejected"]
    assert secure["depth_sites"] == plain["depth_sites"] == [100, 101, 102]

    # each site's plain depth vote, and its encoding as the site would mask it
    depth = [
        r for task, config, r in plain_log if task == "train.masks" and config.get("task") == "influence"
    ]
    shapes = {"depth.blocks": (1, 2), "depth.attention": (1, 2)}
    assert len(depth) == 3 and all(set(r.arrays) == {f"mask.{k}" for k in shapes} for r in depth)
    votes = [decode_masks(r.arrays, shapes) for r in depth]
    plan = secure_plan(make_cfg)
    encoded = [
        np.concatenate([pack_votes(v[k].numpy(), plan.max_sites, plan.modulus_bits) for k in sorted(v)])
        for v in votes
    ]
    depth_masked = [
        r.arrays["masked"]
        for task, config, r in secure_log
        if config.get("task") == "influence" and "masked" in r.arrays
    ]
    assert len(depth_masked) == 3
    for task, _, reply in secure_log:
        assert not any("depth" in key for key in reply.arrays), task
        for array in reply.arrays.values():
            for vector in encoded:  # no site's encoded vote, not even one word in place
                assert not (array.shape == vector.shape and (array == vector).any())


def secure_plan(make_cfg):
    from fedprune.protocols.secure_sums import plan_from_job

    job = _job(make_cfg, 3, "protocol=mask_vote_sync", *SECAGG)
    return plan_from_job(job, load_pruned(job.model.path))


def test_one_shot_secure_depth_votes_give_the_plain_model(make_cfg, tmp_path):
    _run(make_cfg, tmp_path / "plain", 3, "protocol=mask_vote")
    secure = _run(make_cfg, tmp_path / "secure", 3, "protocol=mask_vote", *SECAGG)
    got, expected = load_pruned(tmp_path / "secure" / "model"), load_pruned(tmp_path / "plain" / "model")
    for key, value in expected.state_dict().items():
        assert torch.equal(got.state_dict()[key], value), key
    assert secure["rounds"] == 4 and not secure["rejected"]  # keys, share, mask, unmask


@pytest.mark.parametrize("protocol", ["mask_vote_sync", "mask_vote"])
def test_one_site_vote_equals_centralized_on_its_windows(protocol, make_cfg, tmp_path):
    """One site, wanda: its depth and unit votes are its own choice, so the model is centralized's."""
    _run(make_cfg, tmp_path / "voted", 1, f"protocol={protocol}")
    _run(make_cfg, tmp_path / "centralized", 1, "protocol=centralized")
    got, expected = load_pruned(tmp_path / "voted" / "model"), load_pruned(tmp_path / "centralized" / "model")
    assert len(find_blocks(got)[1]) == 1
    for key, value in expected.state_dict().items():
        assert torch.equal(got.state_dict()[key], value), key


def test_gatenorm_attention_needs_no_vote_and_equals_centralized(make_cfg, tmp_path):
    gatenorm = ["pruner=gatenorm", "structured.ffn=0", "structured.blocks=0", "structured.attention=1"]
    log = []
    voted = _run(make_cfg, tmp_path / "voted", 3, "protocol=mask_vote_sync", *gatenorm, *SECAGG, log=log)
    _run(make_cfg, tmp_path / "centralized", 3, "protocol=centralized", *gatenorm)
    assert "depth_sites" not in voted and voted["attention_removed"] == 1
    assert not any(config.get("task") == "influence" for _, config, _ in log)
    got, expected = load_pruned(tmp_path / "voted" / "model"), load_pruned(tmp_path / "centralized" / "model")
    assert sorted(got.state_dict()) == sorted(expected.state_dict())
    for key, value in expected.state_dict().items():
        assert torch.equal(got.state_dict()[key], value), key


def test_local_prunes_each_site_to_its_own_depth_choice(make_cfg, tmp_path):
    metrics = _run(make_cfg, tmp_path, 3, "protocol=local")
    dense, plans = _site_choices(make_cfg, 3)
    block, source = _remaining_block(tmp_path, dense)  # the saved model is site 0's
    assert source == 1 - plans[0].blocks[0] and isinstance(block.self_attn, ZeroAttention)
    assert metrics["blocks_removed"] == 1 and metrics["attention_removed"] == 1
    assert len(metrics["ppl_per_client"]) == 3


def test_depth_keys_travel_only_when_set(make_cfg):
    from fedprune.protocols.messages import MessageError, MethodSpec

    job = _job(make_cfg, 3, "protocol=mask_vote_sync")
    spec = MethodSpec.from_job(job, get_pruner("wanda"))
    record = spec.to_record()
    assert record["structured_blocks"] == 1 and record["structured_attention"] == 1
    assert MethodSpec.from_record(record) == spec
    plain = MethodSpec.from_record({k: v for k, v in record.items() if not k.startswith("structured_b")})
    assert plain.structured_blocks == 0
    with pytest.raises(MessageError, match="structured_blocks"):
        MethodSpec.from_record({**record, "structured_blocks": -1})
    with pytest.raises(MessageError, match="structured_blocks"):
        MethodSpec.from_record(
            {**record, "pattern": "unstructured", "structured_ffn": 0.0, "structured_heads": 0.0}
        )
    assert "task" not in BlockTask(0).to_record()
