"""Sites enforce their own floors on the server's plan and price their DP releases (site tasks in
process): a site whose floor the plan misses refuses, the server logs why and goes on without it (or
stops); a secagg_dp run reports the rho each site spent, equal to a hand computation, and each site's
ledger holds the same, recorded before the noised vector left the site."""

import dataclasses
import json
import logging
import math

import pytest

from cli.main import job_of
from fedprune.protocols.catalog import SITE_TASKS, validate
from fedprune.protocols.federation import FederationError, Reply, Request
from fedprune.protocols.secure_sums import reply_dp_rho
from fedprune.protocols.tasks import in_process_launcher
from fedprune.secure.dp import epsilon_to_rho
from fedprune.secure.plan import SecurePlan
from fedprune.secure.wire import request_from_arrays, request_to_arrays

SITES = 3
FED = [f"federation.num_clients={SITES}", "federation.min_clients=2", "data.calib_windows=12"]
STATS = ["pruner=sparsegpt", "protocol=stats_sync", *FED]
DP = ["privacy=secagg_dp", "privacy.epsilon=8", "privacy.delta=1e-5", "privacy.token_bound=0.5"]
SEQ_LEN, BOUND, BLOCKS = 16, 0.5, 2
# the tiny Llama's blocks: 7 prunable layers, 4 distinct inputs (q/k/v, o, gate/up, down): 4 Gram slots
SLOTS = 4
_DP_PLAN = SecurePlan(
    threshold=2, modulus_bits=64, max_sites=3, max_tokens=192, token_bound=BOUND, dp_sigma=1.0
)


def _run(make_cfg, folder, overrides, node_config, tasks=None, sites=SITES):
    job = job_of(make_cfg(*overrides))
    launcher = in_process_launcher(sites, 2, {**SITE_TASKS, **(tasks or {})}, node_config)
    return validate(job).run(job, folder, launcher)


def _ledgers(tmp_path, **extra):
    """Per site: a ledger in the test's folder (and ``extra`` keys for site 102 only)."""
    return lambda i: {"dp-ledger": str(tmp_path / f"ledger{i}.json"), **(extra if i == 2 else {})}


def _ledger_entry(tmp_path, i):
    (entry,) = json.loads((tmp_path / f"ledger{i}.json").read_text())["data"].values()
    return entry


def _rho_per_release(sigma):
    """zCDP of one block's release: Δ = √2·seq_len·A²·√slots (Gram slots), rho = Δ²/(2σ²)."""
    delta = math.sqrt(2) * SEQ_LEN * BOUND**2 * math.sqrt(SLOTS)
    return delta**2 / (2 * sigma**2)


def test_a_site_refuses_a_threshold_below_its_floor_and_the_run_goes_on(make_cfg, tmp_path, caplog):
    args = ["pruner=wanda", "protocol=mask_vote_sync", *FED, "privacy=secagg", "privacy.threshold=2"]
    with caplog.at_level(logging.WARNING):
        metrics = _run(make_cfg, tmp_path, args, lambda i: {"secagg-min-threshold": 3} if i == 2 else {})
    assert metrics["num_clients"] == 2 and "sites_per_sum" not in metrics  # left out of every sum
    (rejected,) = metrics["rejected"]
    assert rejected["node"] == 102 and rejected["round"] == 1  # round 0 is start, 1 is the keys round
    assert "threshold=2 below secagg-min-threshold=3" in rejected["reason"]
    assert "threshold=2 below secagg-min-threshold=3" in caplog.text  # the server's log names it


def test_a_minority_threshold_is_refused_by_every_site_and_the_run_stops(make_cfg, tmp_path, caplog):
    args = ["pruner=wanda", "protocol=mask_vote_sync", *FED[:2], "federation.num_clients=4"]
    args += ["data.calib_windows=12", "privacy=secagg", "privacy.threshold=2"]
    with caplog.at_level(logging.WARNING), pytest.raises(FederationError, match="fewer than"):
        _run(make_cfg, tmp_path, args, None, sites=4)  # the default policy: t must exceed 4/2
    server = [r.getMessage() for r in caplog.records if r.name == "fedprune.protocols.federation"]
    assert (
        sum("PolicyError: site policy refuses the plan: threshold=2 must be > 4/2" in m for m in server) == 4
    )
    assert not (tmp_path / "metrics.json").exists()


def test_a_site_refuses_too_little_noise_for_its_epsilon(make_cfg, tmp_path):
    """Site 102 agreed to epsilon 2; the server calibrated sigma for epsilon 8: refused at key agreement."""
    metrics = _run(make_cfg, tmp_path, [*STATS, *DP], _ledgers(tmp_path, **{"dp-max-epsilon": 2.0}))
    (rejected,) = metrics["rejected"]
    assert rejected["node"] == 102 and "below the floor" in rejected["reason"]
    assert "dp-max-epsilon=2.0" in rejected["reason"] and "dp_sigma=" in rejected["reason"]
    assert metrics["num_clients"] == 2 and set(metrics["dp_rho_spent"]) == {"100", "101"}
    assert not (tmp_path / "ledger2.json").exists()  # it released nothing


def test_secagg_dp_reports_the_rho_each_site_spent(make_cfg, tmp_path):
    node = _ledgers(tmp_path)
    metrics = _run(make_cfg, tmp_path, [*STATS, *DP], lambda i: {**node(i), "dp-max-epsilon": 8.0})
    sigma = metrics["dp_sigma"]
    expected = BLOCKS * _rho_per_release(sigma)  # by hand, independent of the code under test
    assert metrics["dp_rho_spent"] == pytest.approx({"100": expected, "101": expected, "102": expected})
    assert expected <= epsilon_to_rho(8.0, 1e-5)  # within what the server calibrated (7 slots > 4)
    for i in range(SITES):
        entry = _ledger_entry(tmp_path, i)
        assert entry["releases"] == BLOCKS and entry["rho"] == pytest.approx(expected)
    assert not metrics["rejected"]


def _lost_after_sending(site, request):
    """Site 102's block-1 vector is lost on the way (after the site built and counted it)."""
    reply = SITE_TASKS["train.secagg"](site, request)
    if site.node_id == 102 and request.config["secagg.stage"] == "mask" and int(request.config["block"]) == 1:
        raise ConnectionError("vector lost in transit")
    return reply


def test_a_release_is_recorded_before_it_is_sent_and_the_budget_is_enforced(make_cfg, tmp_path):
    metrics = _run(
        make_cfg,
        tmp_path / "lost",
        [*STATS, *DP],
        _ledgers(tmp_path / "lost"),
        {"train.secagg": _lost_after_sending},
    )
    one = _rho_per_release(metrics["dp_sigma"])
    assert metrics["dp_rho_spent"]["102"] == pytest.approx(one)  # the server received one release
    assert _ledger_entry(tmp_path / "lost", 2) == {
        "releases": 2,
        "rho": pytest.approx(2 * one),
    }  # it sent two
    # a budget of 1.5 releases: the second is refused before any noise is drawn, and not recorded
    budget = _ledgers(tmp_path / "budget", **{"dp-budget-rho": 1.5 * one})
    metrics = _run(make_cfg, tmp_path / "budget", [*STATS, *DP], budget)
    (rejected,) = metrics["rejected"]
    assert rejected["node"] == 102 and "budget rho" in rejected["reason"]
    assert metrics["sites_per_sum"] == [[100, 101, 102], [100, 101]]
    assert _ledger_entry(tmp_path / "budget", 2) == {"releases": 1, "rho": pytest.approx(one)}
    # the next run on the same data (same ledger) is refused at its first release
    again = _run(make_cfg, tmp_path / "again", [*STATS, *DP], budget)
    assert [r["node"] for r in again["rejected"]] == [102] and "budget" in again["rejected"][0]["reason"]


class _PaddingServer:
    """A server that pads every unmask request's survivors with an id no site knows."""

    def __init__(self, transport):
        self.transport = transport

    def node_ids(self):
        return self.transport.node_ids()

    def request_bytes(self, request):
        return self.transport.request_bytes(request)

    def exchange(self, task, requests, timeout):
        if task == "train.secagg" and next(iter(requests.values())).config["secagg.stage"] == "unmask":
            requests = {node: self._pad(request) for node, request in requests.items()}
        return self.transport.exchange(task, requests, timeout)

    @staticmethod
    def _pad(request):
        unmask = request_from_arrays(request.routed)
        padded = dataclasses.replace(unmask, survivors=unmask.survivors | {999})
        return Request(request.config, request.update, request_to_arrays(padded))


def test_survivors_outside_the_neighbours_are_refused(make_cfg, tmp_path, caplog):
    job = job_of(make_cfg("pruner=wanda", "protocol=mask_vote_sync", *FED, "privacy=secagg"))
    inner = in_process_launcher(SITES, 2)

    def launch(server_main):
        def padded(fed):
            fed.transport = _PaddingServer(fed.transport)
            server_main(fed)

        inner(padded)

    with caplog.at_level(logging.WARNING), pytest.raises(FederationError):
        validate(job).run(job, tmp_path, launch)
    server = [r.getMessage() for r in caplog.records if r.name == "fedprune.protocols.federation"]
    assert sum("survivors/dropped [999] are not neighbours" in line for line in server) == SITES


def test_a_site_that_requires_dp_never_sends_statistics_in_the_clear(make_cfg, tmp_path):
    metrics = _run(make_cfg, tmp_path, STATS, lambda i: {"dp-max-epsilon": 8.0} if i == 2 else {})
    (rejected,) = metrics["rejected"]
    assert rejected["node"] == 102 and "refuses to send train.stats in the clear" in rejected["reason"]
    assert metrics["num_clients"] == 2 and "dp_rho_spent" not in metrics


def _nan_rho(site, request):
    reply = SITE_TASKS["train.secagg"](site, request)
    if site.node_id == 102 and request.config["secagg.stage"] == "mask":
        return Reply(reply.arrays, {**reply.metrics, "dp_rho": float("nan")})
    return reply


def test_the_server_rejects_a_dp_reply_without_a_finite_rho(make_cfg, tmp_path):
    metrics = _run(make_cfg, tmp_path, [*STATS, *DP], _ledgers(tmp_path), {"train.secagg": _nan_rho})
    (rejected,) = metrics["rejected"]
    assert rejected["node"] == 102 and "dp_rho: expected a finite number >= 0, got nan" in rejected["reason"]
    assert set(metrics["dp_rho_spent"]) == {"100", "101"} and metrics["num_clients"] == 2
    plan = dataclasses.replace(_DP_PLAN, dp_sigma=0.0)
    assert reply_dp_rho({}, plan) is None  # without DP nothing is asked
    for bad in ({}, {"dp_rho": -1.0}, {"dp_rho": True}, {"dp_rho": "0.1"}, {"dp_rho": float("inf")}):
        with pytest.raises(ValueError, match="dp_rho"):
            reply_dp_rho(bad, _DP_PLAN)
    assert reply_dp_rho({"dp_rho": 0.25}, _DP_PLAN) == 0.25


def test_a_site_at_the_agreed_epsilon_accepts_owl_and_prices_the_dense_release(make_cfg, tmp_path):
    """``allocation=owl``: the site's floor composes the run's releases as the server's calibration does
    (two blocks of 7 layers, plus all 14 dense layers' Σx²), so a site whose epsilon is the run's accepts;
    a site with a smaller epsilon refuses; the dense release is priced by its own slots."""
    owl = [*STATS, *DP, "allocation=owl", "sparsity=0.6"]
    metrics = _run(make_cfg, tmp_path / "ok", owl, lambda i: {"dp-max-epsilon": 8.0, **_ledgers(tmp_path)(i)})
    assert metrics["num_clients"] == SITES and metrics["dp_epsilon"] == pytest.approx(8.0)
    sigma = metrics["dp_sigma"]
    # the dense release: Σx² of every distinct layer input of both blocks (4 per block), then 2 block releases
    dense = (math.sqrt(2) * SEQ_LEN * BOUND**2) ** 2 * 2 * SLOTS / (2 * sigma**2)
    expected = dense + BLOCKS * _rho_per_release(sigma)
    assert metrics["dp_rho_spent"] == pytest.approx({"100": expected, "101": expected, "102": expected})
    strict = _run(make_cfg, tmp_path / "strict", owl, lambda i: {"dp-max-epsilon": 7.9} if i == 2 else {})
    assert strict["num_clients"] == SITES - 1 and "102" not in strict.get("dp_rho_spent", {})
