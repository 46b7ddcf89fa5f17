"""Secure sums over a federation (site tasks in process): a site whose sealed share to one neighbour is
garbage is named by that neighbour and left out; the run finishes with the same model as a plain run in
which that site went away at the same block, and the metrics name the sites of each sum."""

import numpy as np
import torch

from cli.main import job_of
from fedprune import load_pruned
from fedprune.protocols.catalog import SITE_TASKS, validate
from fedprune.protocols.federation import Reply
from fedprune.protocols.tasks import in_process_launcher

SITES = 4
FED = [f"federation.num_clients={SITES}", "federation.min_clients=2", "data.calib_windows=12"]
ARGS = ["pruner=wanda", "protocol=mask_vote_sync", *FED]
BAD, VICTIM = 101, 102


# t=2 of 4 sites (n - 2 >= t with one victim): below the sites' default honest-majority floor
MINORITY = {"secagg-honest-majority": False}


def _run(make_cfg, folder, tasks, *overrides):
    job = job_of(make_cfg(*ARGS, *overrides))
    launcher = in_process_launcher(SITES, 2, {**SITE_TASKS, **tasks}, MINORITY)
    return validate(job).run(job, folder, launcher)


def _garbage_share(site, request):
    """Site 101 seals its share of instance 1 (block 1's sum) to site 102 as random bytes."""
    answer = SITE_TASKS["train.secagg"](site, request)
    key = f"1/share.{VICTIM}"
    if site.node_id != BAD or request.config["secagg.stage"] != "share":
        return answer
    arrays = dict(answer.arrays)
    arrays[key] = np.random.default_rng(0).integers(0, 256, arrays[key].size, dtype=np.uint8)
    return Reply(arrays=arrays, metrics=answer.metrics)


def _gone_at_block_1(site, request):
    if site.node_id == BAD and int(request.config["block"]) == 1:
        raise RuntimeError("site 101 went away")
    return SITE_TASKS["train.masks"](site, request)


def test_a_garbage_share_leaves_its_sender_out_and_the_run_matches_the_plain_dropout(make_cfg, tmp_path):
    secure = _run(
        make_cfg,
        tmp_path / "secure",
        {"train.secagg": _garbage_share},
        "privacy=secagg",
        "privacy.threshold=2",
    )
    plain = _run(make_cfg, tmp_path / "plain", {"train.masks": _gone_at_block_1})
    everyone, others = [100, 101, 102, 103], [100, 102, 103]
    assert plain["sites_per_sum"] == [everyone, others]  # the reference really lost 101 at block 1
    assert secure["sites_per_sum"] == [everyone, others] and secure["num_clients"] == 3
    reasons = {(r["node"], r["reason"]) for r in secure["rejected"]}
    assert reasons == {(BAD, f"share to client {VICTIM} failed to open")}  # the victim is not blamed
    got, expected = load_pruned(tmp_path / "secure" / "model"), load_pruned(tmp_path / "plain" / "model")
    for key, value in expected.state_dict().items():  # exact vote counts of the other three sites
        assert torch.equal(got.state_dict()[key], value), key
