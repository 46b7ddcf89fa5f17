"""HideNseek over real Flower simulations (Ray backend): 3 digits sites, a few rounds."""

import json
import math

import pytest
from hydra import compose, initialize_config_dir

import fedprune.hidenseek.site as real
from cli.main import job_of, run
from cli.simulation import simulation_launcher
from clients.client_app import build_app
from fedprune.config import ConfigError
from fedprune.hidenseek.job import build_job
from fedprune.hidenseek.server import run_hidenseek_rounds
from fedprune.protocols.catalog import SITE_TASKS
from fedprune.protocols.federation import Federation, Reply
from tests.conftest import CONF_DIR

pytestmark = pytest.mark.integration

HEADER_MAX = 400  # npy header + record keys + the metrics record


def _cfg(*overrides):
    base = ["protocol=hidenseek", "federation.num_clients=3", "federation.min_clients=1", "progress=false"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[*base, *overrides])


@pytest.mark.parametrize("aggregation", ["vote", "score_delta"])
def test_hidenseek_simulation_learns_and_uploads_one_bit_per_kept_weight(aggregation, tmp_path):
    cfg = _cfg(
        "protocol.rounds=4",
        "protocol.local_epochs=2",
        "protocol.synflow_iterations=20",
        "protocol.alpha=1.0",
        f"protocol.aggregation={aggregation}",
    )
    metrics = run(cfg, tmp_path)
    accuracy = metrics["accuracy"]
    assert len(accuracy) == 1 + 4
    assert accuracy[-1] > 0.5  # 10 classes: chance is 0.1
    assert accuracy[-1] > accuracy[0] + 0.3  # the untrained sign mask (all +1) is near chance
    kept = metrics["kept_weights"]
    assert kept == round(0.5 * metrics["total_weights"])
    # score_delta: one uint8 array, the sign bits + the float32 scale + the exact top changes (delta_topk
    # of the kept weights, uint16 index + float16 value each)
    payload = math.ceil(kept / 8) + (4 + 4 * int(0.025 * kept) if aggregation == "score_delta" else 0)
    assert aggregation == "vote" or metrics["delta_topk"] == 0.025
    for per_site in metrics["bytes_up_per_client_per_round"]:
        assert sorted(per_site) == ["0", "1", "2"]
        for sent in per_site.values():
            # one npy header and key, and the metrics record
            assert payload < sent <= payload + HEADER_MAX
            # the budget: at most 1/32 of dense FedAvg's upload (float32 per weight, headers not counted)
            assert 32 * sent <= 4 * metrics["total_weights"]
    # down: the mask (1 bit per weight) and the global signs (1 bit per kept weight; score_delta: the
    # global scores, float32 per kept weight) + config
    down = metrics["bytes_down_per_client_per_round"][0]["0"]
    state_bytes = math.ceil(kept / 8) if aggregation == "vote" else 4 * kept
    assert math.ceil(metrics["total_weights"] / 8) + state_bytes < down
    assert down < math.ceil(metrics["total_weights"] / 8) + state_bytes + 2 * HEADER_MAX
    assert metrics["rejected"] == []
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["accuracy"] == accuracy
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


# A client app whose site 0 uploads one byte too few in round 3: the server must leave it out and go on.
def _short_codes(site, request) -> Reply:
    reply = real.hidenseek_train(site, request)
    if site.node_config["partition-id"] == 0 and int(request.config["round"]) == 3:
        reply.arrays["codes"] = reply.arrays["codes"][:-1].copy()
    return reply


bad_app = build_app({**SITE_TASKS, "train.hidenseek": _short_codes})


class _LateTransport:
    """The real simulation transport, except that one node connects only after round 1 started."""

    def __init__(self, transport, late: int) -> None:
        self.transport, self.late, self.calls = transport, late, 0

    def node_ids(self):
        self.calls += 1
        nodes = list(self.transport.node_ids())
        return nodes if self.calls > 1 else [n for n in nodes if n != self.late]

    def request_bytes(self, request):
        return self.transport.request_bytes(request)

    def exchange(self, task, requests, timeout):
        return self.transport.exchange(task, requests, timeout)


def test_late_site_gets_current_signs_and_malformed_reply_is_left_out():
    # the vote (1-bit download): round 1 surely changes the global signs (with score_delta, one epoch of
    # two sites may move no score past zero)
    cfg = _cfg(
        "protocol.rounds=3",
        "protocol.local_epochs=1",
        "protocol.synflow_iterations=10",
        "protocol.aggregation=vote",
    )
    job = build_job(job_of(cfg))
    result = {}

    def server_main(federation) -> None:
        nodes = federation.nodes
        fed = Federation(_LateTransport(federation.transport, late=nodes[-1]), nodes[:-1], min_clients=1)
        result["outcome"] = run_hidenseek_rounds(fed, job)
        result["fed"] = fed
        result["late"] = nodes[-1]

    simulation_launcher(job_of(cfg).federation, bad_app)(server_main)
    records, fed = result["outcome"].records, result["fed"]
    sites = [set(record.bytes_up) for record in records[1:]]
    assert [len(s) for s in sites] == [2, 3, 2]
    (late_partition,) = sites[1] - sites[0]
    # the late site passed the CRC check in round 2: it started from round 2's global signs
    assert records[1].accuracy != records[0].accuracy  # round 1 changed the global signs
    assert fed.bytes_down[result["late"]] == 2 * records[2].bytes_down[late_partition]
    # round 3 (Federation's round number 2): partition 0's short upload is rejected, the others count
    assert sites[2] == {0, 1, 2} - {0}
    assert len(fed.rejected) == 1
    number, _, reason = fed.rejected[0]
    assert number == 2 and "codes must be uint8" in reason
    assert 0.0 < records[-1].accuracy <= 1.0


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("protocol.density=0", "protocol.density"),
        ("protocol.variant=signs", "protocol.variant"),
        ("protocol.prune=snip", "protocol.prune"),
        ("federation.min_clients=4", "federation.min_clients"),
        ("speed.measure=true", "speed.measure"),
    ],
)
def test_bad_hidenseek_config_names_the_key(override, key, tmp_path):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        run(_cfg(override), tmp_path)
    assert not (tmp_path / "metrics.json").exists()
