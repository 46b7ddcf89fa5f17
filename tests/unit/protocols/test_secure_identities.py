"""Authenticated secure sums over a federation (site tasks in process, identities from node config):
the result equals the unauthenticated run's, with one consistency round more per sum; a router that
substitutes a neighbour's key for one site makes that site abort (a dropout), and the others' sum goes
on; sites without an identity, or asked to run unauthenticated, refuse with a clear error."""

import dataclasses

import numpy as np
import pytest
import torch

from cli.main import job_of
from fedprune import load_pruned
from fedprune.protocols.catalog import SITE_TASKS, validate
from fedprune.protocols.federation import Federation
from fedprune.protocols.secure_site import (
    provision_simulated_identities,
    simulated_identity_path,
    site_credentials,
)
from fedprune.protocols.tasks import InProcessTransport, Site, in_process_launcher

SITES = 4
ARGS = [
    "pruner=wanda",
    "protocol=mask_vote_sync",
    f"federation.num_clients={SITES}",
    "federation.min_clients=2",
    "data.calib_windows=12",
    "privacy=secagg",
    "privacy.threshold=3",  # more than half of the 4 sites (the sites' floor)
]
VICTIM = 102


def _sites(folder, roster) -> list[Site]:
    """Sites as at a real deployment: identity and roster paths in the node config."""
    return [
        Site(
            100 + i,
            {
                "partition-id": i,
                "num-partitions": SITES,
                "identity-key": str(simulated_identity_path(folder, i)),
                "roster": str(roster),
            },
        )
        for i in range(SITES)
    ]


def _launcher(sites, tasks):
    def launch(server_main) -> None:
        transport = InProcessTransport(sites, tasks)
        server_main(Federation(transport, transport.node_ids(), 2))

    return launch


def _run_authenticated(make_cfg, tmp_path, tasks=None):
    roster = provision_simulated_identities(tmp_path / "ids", SITES)
    job = job_of(make_cfg(*ARGS, f"privacy.roster={roster}"))
    launch = _launcher(_sites(tmp_path / "ids", roster), {**SITE_TASKS, **(tasks or {})})
    return validate(job).run(job, tmp_path / "auth", launch)


def test_authenticated_sums_equal_unauthenticated_ones_with_a_consistency_round_each(make_cfg, tmp_path):
    auth = _run_authenticated(make_cfg, tmp_path)
    job = job_of(make_cfg(*ARGS))
    plain = validate(job).run(job, tmp_path / "plain", in_process_launcher(SITES, 2))
    assert not auth["rejected"] and auth["num_clients"] == SITES
    sums = 2  # one per block of the tiny model
    assert auth["rounds"] == plain["rounds"] + sums
    got, expected = load_pruned(tmp_path / "auth" / "model"), load_pruned(tmp_path / "plain" / "model")
    for key, value in expected.state_dict().items():
        assert torch.equal(got.state_dict()[key], value), key


def _substitute_a_key(site, request):
    """The router gives site 102 its own public key for neighbour 100 in instance 0."""
    if site.node_id == VICTIM and request.config["secagg.stage"] == "share":
        routed = dict(request.routed)
        routed["0/enc.100"] = np.frombuffer(bytes(range(1, 33)), dtype=np.uint8).copy()
        request = dataclasses.replace(request, routed=routed)
    return SITE_TASKS["train.secagg"](site, request)


def test_a_substituted_key_makes_its_victim_abort_and_the_others_sum_goes_on(make_cfg, tmp_path):
    result = _run_authenticated(make_cfg, tmp_path, {"train.secagg": _substitute_a_key})
    assert result["num_clients"] == SITES - 1
    (rejected,) = result["rejected"]
    assert (
        rejected["node"] == VICTIM
        and "advert routed for client 100 has an invalid signature" in rejected["reason"]
    )


def _site(node: dict) -> Site:
    return Site(7, {"partition-id": 0, **node})


def test_a_site_without_identity_names_the_node_config_keys(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDPRUNE_SECAGG_IDENTITIES", raising=False)
    with pytest.raises(RuntimeError, match="node config 'identity-key=<path>' and 'roster=<path>'"):
        site_credentials(_site({}), authenticated=True)
    with pytest.raises(RuntimeError, match="identity-key=<path>"):  # not even unauthenticated by default
        site_credentials(_site({}), authenticated=False)
    assert site_credentials(_site({"secagg-unauthenticated": True}), authenticated=False) is None
    with pytest.raises(RuntimeError, match="node config key 'roster' is missing"):
        site_credentials(_site({"identity-key": str(tmp_path / "a.key")}), authenticated=True)


def test_a_site_with_an_identity_refuses_an_unauthenticated_run(tmp_path, monkeypatch):
    roster = provision_simulated_identities(tmp_path, 2)
    node = {"identity-key": str(simulated_identity_path(tmp_path, 0)), "roster": str(roster)}
    assert site_credentials(_site(node), authenticated=True) is not None
    with pytest.raises(RuntimeError, match="refuses an unauthenticated run"):
        site_credentials(_site(node), authenticated=False)
    monkeypatch.setenv("FEDPRUNE_SECAGG_IDENTITIES", str(tmp_path))  # the simulation's folder
    identity, found = site_credentials(_site({}), authenticated=True)
    assert found == frozenset(found) and len(found) == 2
