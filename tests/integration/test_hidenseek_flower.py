"""HideNseek over real Flower simulations (Ray backend): 3 digits sites, a few rounds."""

import json
import math

import pytest
from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp
from hydra import compose, initialize_config_dir

import clients.hidenseek_client as real
from cli.federated import simulation_launcher
from cli.hidenseek import build_job
from cli.main import run
from cli.validate import ConfigError
from server.hidenseek_workflow import run_hidenseek_rounds
from server.job import wait_for_nodes
from server.rounds import Federation
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
bad_app = ClientApp()


@bad_app.train("hidenseek")
def _short_codes(msg: Message, context: Context) -> Message:
    reply = real.hidenseek_train(msg, context)
    if context.node_config["partition-id"] == 0 and int(msg.content["config"]["round"]) == 3:
        record = reply.content["payload"]
        record["codes"] = Array(record["codes"].numpy()[:-1].copy())
    return reply


class _LateGrid:
    """The real simulation grid, except that one node connects only after round 1 started."""

    def __init__(self, grid, late: int) -> None:
        self.grid, self.late, self.calls = grid, late, 0

    def get_node_ids(self):
        self.calls += 1
        nodes = list(self.grid.get_node_ids())
        return nodes if self.calls > 1 else [n for n in nodes if n != self.late]

    def send_and_receive(self, messages, timeout=None):
        return self.grid.send_and_receive(messages, timeout=timeout)


def test_late_site_gets_current_signs_and_malformed_reply_is_left_out():
    # the vote (1-bit download): round 1 surely changes the global signs (with score_delta, one epoch of
    # two sites may move no score past zero)
    cfg = _cfg(
        "protocol.rounds=3",
        "protocol.local_epochs=1",
        "protocol.synflow_iterations=10",
        "protocol.aggregation=vote",
    )
    job = build_job(cfg)
    result = {}

    def server_main(grid) -> None:
        nodes = wait_for_nodes(grid, 3)
        fed = Federation(_LateGrid(grid, late=nodes[-1]), nodes[:-1], min_clients=1)
        result["outcome"] = run_hidenseek_rounds(fed, job)
        result["fed"] = fed
        result["late"] = nodes[-1]

    simulation_launcher(cfg, bad_app)(server_main)
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
    ],
)
def test_bad_hidenseek_config_names_the_key(override, key, tmp_path):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        run(_cfg(override), tmp_path)
    assert not (tmp_path / "metrics.json").exists()
