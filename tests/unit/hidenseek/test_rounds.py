"""HideNseek rounds in process: the real server routine and site task over an in-process transport."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hydra import compose, initialize_config_dir

from cli.main import job_of
from fedprune.hidenseek.aggregate import pack_signs, unpack_signs
from fedprune.hidenseek.job import build_job
from fedprune.hidenseek.models import build_model, prunable_weights
from fedprune.hidenseek.rounds import codes_of_scores, global_model, initial_codes, set_kept_scores_
from fedprune.hidenseek.server import run_hidenseek_rounds
from fedprune.hidenseek.sign_supermask import supermask_layers
from fedprune.hidenseek.site import encode_mask, local_round, site_data
from fedprune.protocols.federation import Federation
from fedprune.protocols.tasks import InProcessTransport, Site
from tests.conftest import CONF_DIR


def _in_process(aggregation: str, rounds: int):
    """The real server routine and site task, with 3 sites in this process (no Flower)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                "protocol=hidenseek",
                "federation.num_clients=3",
                "federation.min_clients=3",
                f"protocol.rounds={rounds}",
                "protocol.local_epochs=2",
                "protocol.synflow_iterations=20",
                "protocol.alpha=0.5",
                f"protocol.aggregation={aggregation}",
            ],
        )
    job = build_job(job_of(cfg))
    sites = [Site(10 + p, {"partition-id": p, "num-partitions": 3}) for p in range(3)]
    fed = Federation(InProcessTransport(sites), [10, 11, 12], min_clients=3)
    return job, fed, run_hidenseek_rounds(fed, job)


def test_in_process_hidenseek_on_digits_beats_chance_and_untrained_mask():
    torch.set_num_threads(1)
    job, fed, outcome = _in_process("vote", rounds=6)
    accuracies = [record.accuracy for record in outcome.records]
    assert accuracies[0] < 0.3  # the pruned random network with all-+1 signs is near chance
    assert accuracies[-1] > 0.5 and accuracies[-1] > accuracies[0] + 0.3
    kept = sum(int(m.sum()) for m in job.masks.values())
    # every round, each site uploads exactly its packed signs: 1 bit per kept weight
    assert all(sent == (kept + 7) // 8 for r in outcome.records[1:] for sent in r.bytes_up.values())
    assert not fed.rejected and sorted(outcome.records[1].bytes_up) == [0, 1, 2]


def test_in_process_votes_equal_a_hand_computed_majority():
    """Round 1 of the real routine equals a majority vote computed here from the sites' own uploads."""
    torch.set_num_threads(1)
    job, _, outcome = _in_process("vote", rounds=1)
    num_kept = sum(int(m.sum()) for m in job.masks.values())
    arrays = {"mask": encode_mask(job.masks), "codes": pack_signs(initial_codes(job.masks)).numpy()}
    config = replace(job.task, round=1, num_kept=num_kept)
    votes = torch.zeros(num_kept, dtype=torch.int32)
    for p in range(3):
        x, y = site_data(config, p, 3)
        votes += unpack_signs(torch.from_numpy(local_round(config, arrays, x, y, p)["codes"]), num_kept)
    expected = torch.where(votes == 0, initial_codes(job.masks).int(), votes.sign()).to(torch.int8)
    assert torch.equal(outcome.state, expected)


def test_set_kept_scores_writes_kept_entries_in_mask_order():
    model = build_model("mlp", 0, "kaiming_normal", hidden=4)
    masks = {name: torch.zeros_like(w, dtype=torch.bool) for name, w in prunable_weights(model).items()}
    first, last = list(masks)[0], list(masks)[-1]
    masks[first][0, :2] = True
    masks[last][1, 3] = True
    supermask = global_model(model, masks, initial_codes(masks), "sign", 0.1)
    set_kept_scores_(supermask, torch.tensor([-0.5, 0.2, -0.3]), masks)
    layers = supermask_layers(supermask)
    assert layers[first].scores[0, :3].tolist() == pytest.approx([-0.5, 0.2, 0.1])  # unkept stays 0.1
    assert layers[last].scores[1, 3].item() == pytest.approx(-0.3)
    assert codes_of_scores(torch.tensor([-0.5, 0.0, 0.2])).tolist() == [-1, 1, 1]
