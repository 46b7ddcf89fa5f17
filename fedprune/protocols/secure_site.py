"""The site's side of secure aggregation (``train.secagg``): wraps any summed task's payload.

Each secure sum is one protocol instance (a number) with fresh keys; ``secagg.stage`` says which step
(see ``fedprune/protocols/secure_sums.py``): ``keys`` and ``share`` run the first two steps for instances
``secagg.first .. + secagg.count - 1`` at once; ``mask`` (instance ``secagg.instance``) computes the
plain payload of ``secagg.task`` (any entry of :data:`fedprune.protocols.llm_site.PAYLOADS`), encodes it
as one uint64 vector with the public codes of the plan, adds its share of DP noise (``secagg_dp``) and
sends it masked; ``consistency`` (authenticated runs) signs the survivor set; ``unmask`` answers the
server's request. Each instance's secrets stay on this site's disk, one file per instance (each message
may run in a fresh process), deleted after ``unmask``. Masks are never reused across sums.

Identity: a site signs its adverts and survivor sets with its long-term Ed25519 identity and checks
its neighbours' against the roster (``fedprune.secure.identity``). It finds them in its node config,
``identity-key=<path> roster=<path>`` (a real deployment), or else, in a Flower simulation, in the
folder named by the environment variable ``FEDPRUNE_SECAGG_IDENTITIES`` (``site-<partition-id>.key``
and ``roster.json``, written by the launcher). A site without either refuses secure aggregation, unless
its node config says ``secagg-unauthenticated=true`` (the in-process test sites) and the server runs
unauthenticated; a site with an identity never takes part in an unauthenticated run (the server would
otherwise only have to claim one to route keys unchecked).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedprune.protocols.federation import Reply, Request
from fedprune.protocols.llm_site import PAYLOADS, Payload
from fedprune.protocols.messages import SiteJob
from fedprune.protocols.site_state import state_dir
from fedprune.protocols.tasks import Site, reply, site_task
from fedprune.secure import SecAggClient
from fedprune.secure.codec import encode_stats_vector, pack_votes
from fedprune.secure.dp import site_noise
from fedprune.secure.identity import (
    Roster,
    identity_public,
    load_identity,
    load_roster,
    new_identity,
    save_identity,
    save_roster,
)
from fedprune.secure.plan import SecurePlan
from fedprune.secure.wire import (
    advert_to_arrays,
    instance_arrays,
    masked_to_arrays,
    peers_from_arrays,
    prefixed,
    reply_to_arrays,
    request_from_arrays,
    shares_from_arrays,
    shares_to_arrays,
    signature_to_arrays,
    signatures_from_arrays,
)

logger = logging.getLogger(__name__)

IDENTITY_ENV = "FEDPRUNE_SECAGG_IDENTITIES"  # simulation: the folder of the sites' identities
IDENTITY_KEY, ROSTER_KEY = "identity-key", "roster"  # node-config keys of a real site
UNAUTHENTICATED_KEY = "secagg-unauthenticated"  # node config: may run without identities (tests)

Credentials = tuple[Ed25519PrivateKey, Roster]


def simulated_identity_path(folder: str | os.PathLike, partition: int) -> Path:
    """Where a simulated site's identity lies in the launcher's identity folder."""
    return Path(folder) / f"site-{int(partition)}.key"


def simulated_roster_path(folder: str | os.PathLike) -> Path:
    """The roster in the launcher's identity folder."""
    return Path(folder) / "roster.json"


def provision_simulated_identities(folder: str | os.PathLike, num_sites: int) -> Path:
    """A fresh identity per simulated site (``site-<i>.key``, mode 0600) and their roster in ``folder``;
    the roster's path. The launcher points the sites at ``folder`` with :data:`IDENTITY_ENV`."""
    identities = [new_identity() for _ in range(num_sites)]
    for i, identity in enumerate(identities):
        save_identity(identity, simulated_identity_path(folder, i))
    return save_roster([identity_public(k) for k in identities], simulated_roster_path(folder))


def _configured(site: Site) -> Credentials | None:
    """The site's identity and roster from its node config or the simulation's folder; ``None``: none."""
    node = site.node_config
    if IDENTITY_KEY in node or ROSTER_KEY in node:
        missing = [key for key in (IDENTITY_KEY, ROSTER_KEY) if key not in node]
        if missing:
            raise RuntimeError(f"node config key {missing[0]!r} is missing (secure aggregation needs both)")
        return load_identity(node[IDENTITY_KEY]), load_roster(node[ROSTER_KEY])
    folder = os.environ.get(IDENTITY_ENV)
    if folder and "partition-id" in node:
        path = simulated_identity_path(folder, node["partition-id"])
        return load_identity(path), load_roster(simulated_roster_path(folder))
    return None


def site_credentials(site: Site, authenticated: bool) -> Credentials | None:
    """This site's identity and roster for a run the server says is ``authenticated`` (or not); see
    the module docstring for when that is an error."""
    credentials = _configured(site)
    if credentials is not None and not authenticated:
        raise RuntimeError(
            "this site has a secure-aggregation identity and refuses an unauthenticated run "
            "(the server needs privacy.roster)"
        )
    allowed = site.node_config.get(UNAUTHENTICATED_KEY) in (True, "true")
    if credentials is None and (authenticated or not allowed):
        raise RuntimeError(
            f"privacy=secagg needs this site's identity: set node config '{IDENTITY_KEY}=<path>' and "
            f"'{ROSTER_KEY}=<path>' (make one with `python -m fedprune.secure.identity new PATH`)"
        )
    return credentials


def _client_path(site: Site, request: Request, instance: int):
    folder = state_dir(SiteJob.from_record(request.config).run_key, site.key)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"secagg_{instance}.json"


def _instances(config) -> range:
    return range(int(config["secagg.first"]), int(config["secagg.first"]) + int(config["secagg.count"]))


def _save_client(path, client: SecAggClient) -> None:
    """Write the client's secrets atomically, readable by this user only."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(client.to_state(), handle)
    os.replace(tmp, path)


def _load_client(path, credentials: Credentials | None) -> SecAggClient:
    if not path.exists():
        raise RuntimeError(f"no secure-aggregation state {path.name} at this site: 'keys' never arrived")
    identity, roster = (None, None) if credentials is None else credentials
    return SecAggClient.from_state(json.loads(path.read_text()), identity=identity, roster=roster)


def _votes_vector(masks: dict, plan: SecurePlan) -> np.ndarray:
    """Sorted layers' keep-masks, each packed in count fields (see ``codec.pack_votes``)."""
    return np.concatenate(
        [
            pack_votes(masks[name].numpy().astype(bool), plan.max_sites, plan.modulus_bits)
            for name in sorted(masks)
        ]
    )


def _stats_vector(arrays: dict, plan: SecurePlan) -> np.ndarray:
    """Statistics slots (+ this site's share of DP noise) and counts as one vector."""
    if plan.dp_sigma > 0:
        rng = np.random.default_rng()  # OS entropy
        for key in [k for k in arrays if k.startswith("total.")]:
            arrays[key] = arrays[key] + site_noise(arrays[key].shape, plan.dp_sigma, plan.threshold, rng)
    return encode_stats_vector(arrays, plan.value_code(), plan.count_code())


def _payload(site: Site, request: Request, plan: SecurePlan) -> tuple[np.ndarray, dict, int]:
    """This site's encoded vector, its public metadata arrays and its tokens."""
    task = str(request.config["secagg.task"])
    if task not in PAYLOADS:
        raise ValueError(f"unknown secure-aggregation task {task!r}; known: {sorted(PAYLOADS)}")
    bound = plan.token_bound if plan.dp_sigma > 0 else None
    payload: Payload = PAYLOADS[task](site, request, token_bound=bound)
    if payload.kind == "stats":
        arrays = payload.values
        return _stats_vector(arrays, plan), {"index": arrays["index"]}, payload.tokens
    return _votes_vector(payload.values, plan), {}, payload.tokens


def _keys(site: Site, request: Request, plan: SecurePlan, arrays: dict, creds: Credentials | None) -> Reply:
    out = {}
    identity, roster = (None, None) if creds is None else creds
    run = SiteJob.from_record(request.config).run_key
    for k in _instances(request.config):
        auth = dict(identity=identity, roster=roster, run=run, instance=k)
        client = SecAggClient(int(site.node_id), plan.modulus_bits, **auth)
        out.update(prefixed(advert_to_arrays(client.advertise_keys()), k))
        _save_client(_client_path(site, request, k), client)
    return reply(out, {"tokens": 0})


def _share(site: Site, request: Request, plan: SecurePlan, arrays: dict, creds: Credentials | None) -> Reply:
    out = {}
    for k in _instances(request.config):
        path = _client_path(site, request, k)
        client = _load_client(path, creds)
        shares = client.share_keys(peers_from_arrays(instance_arrays(arrays, k)), plan.threshold)
        out.update(prefixed(shares_to_arrays(shares, outgoing=True), k))
        _save_client(path, client)
    return reply(out, {"tokens": 0})


def _mask(site: Site, request: Request, plan: SecurePlan, arrays: dict, creds: Credentials | None) -> Reply:
    path = _client_path(site, request, int(request.config["secagg.instance"]))
    client = _load_client(path, creds)
    vector, public, tokens = _payload(site, request, plan)
    masked = client.masked_input(vector, shares_from_arrays(client.client_id, arrays, outgoing=False))
    _save_client(path, client)
    return reply({**masked_to_arrays(masked), **public}, {"tokens": tokens})


def _consistency(
    site: Site, request: Request, plan: SecurePlan, arrays: dict, creds: Credentials | None
) -> Reply:
    path = _client_path(site, request, int(request.config["secagg.instance"]))
    client = _load_client(path, creds)
    signature = client.check_consistency(request_from_arrays(arrays))
    _save_client(path, client)
    return reply(signature_to_arrays(signature), {"tokens": 0})


def _unmask(site: Site, request: Request, plan: SecurePlan, arrays: dict, creds: Credentials | None) -> Reply:
    path = _client_path(site, request, int(request.config["secagg.instance"]))
    client = _load_client(path, creds)
    signatures = signatures_from_arrays(arrays) if client.authenticated else None
    try:
        answer = client.unmask(request_from_arrays(arrays), signatures)
    finally:
        path.unlink()  # one protocol instance per key pair; a refused unmask ends the instance too
    return reply(reply_to_arrays(answer), {"tokens": 0})


STAGES = {"keys": _keys, "share": _share, "mask": _mask, "consistency": _consistency, "unmask": _unmask}


@site_task("train.secagg")
def secagg(site: Site, request: Request) -> Reply:
    plan = SecurePlan.from_config(request.config)
    stage = str(request.config["secagg.stage"])
    if stage not in STAGES:
        raise ValueError(f"unknown secure-aggregation stage {stage!r}; known: {sorted(STAGES)}")
    credentials = site_credentials(site, bool(request.config.get("secagg.authenticated", False)))
    return STAGES[stage](site, request, plan, dict(request.routed or {}), credentials)
