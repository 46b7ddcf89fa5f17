"""The site's side of secure aggregation (``train.secagg``): wraps any summed task's payload.

Each secure sum is one protocol instance (a number) with fresh keys; ``secagg.stage`` says which step
(see ``fedprune/protocols/secure_sums.py``): ``keys`` and ``share`` run the first two steps for instances
``secagg.first .. + secagg.count - 1`` at once; ``mask`` (instance ``secagg.instance``) computes the
plain payload of ``secagg.task`` (any entry of :data:`fedprune.protocols.llm_site.PAYLOADS`), encodes it
as one uint64 vector with the public codes of the plan, adds its share of DP noise (``secagg_dp``) and
sends it masked; ``unmask`` answers the server's request. Each instance's secrets stay on this site's
disk, one file per instance (each message may run in a fresh process), deleted after ``unmask``. Masks
are never reused across sums.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

import numpy as np

from fedprune.protocols.federation import Reply, Request
from fedprune.protocols.llm_site import PAYLOADS, Payload
from fedprune.protocols.messages import SiteJob
from fedprune.protocols.site_state import reserve_instances, state_dir
from fedprune.protocols.tasks import Site, reply, site_task
from fedprune.secure import SecAggClient
from fedprune.secure.codec import encode_stats_vector, pack_votes
from fedprune.secure.dp import site_noise
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
)

logger = logging.getLogger(__name__)


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


def _load_client(path) -> SecAggClient:
    if not path.exists():
        raise RuntimeError(f"no secure-aggregation state {path.name} at this site: 'keys' never arrived")
    return SecAggClient.from_state(json.loads(path.read_text()))


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


def _keys(site: Site, request: Request, plan: SecurePlan, arrays: dict) -> Reply:
    instances = _instances(request.config)  # refused if any number was keyed here before (a resumed run)
    reserve_instances(SiteJob.from_record(request.config).run_key, site.key, instances.start, len(instances))
    out = {}
    for k in _instances(request.config):
        client = SecAggClient(int(site.node_id), plan.modulus_bits)
        out.update(prefixed(advert_to_arrays(client.advertise_keys()), k))
        _save_client(_client_path(site, request, k), client)
    return reply(out, {"tokens": 0})


def _share(site: Site, request: Request, plan: SecurePlan, arrays: dict) -> Reply:
    out = {}
    for k in _instances(request.config):
        path = _client_path(site, request, k)
        client = _load_client(path)
        shares = client.share_keys(peers_from_arrays(instance_arrays(arrays, k)), plan.threshold)
        out.update(prefixed(shares_to_arrays(shares, outgoing=True), k))
        _save_client(path, client)
    return reply(out, {"tokens": 0})


def _mask(site: Site, request: Request, plan: SecurePlan, arrays: dict) -> Reply:
    path = _client_path(site, request, int(request.config["secagg.instance"]))
    client = _load_client(path)
    vector, public, tokens = _payload(site, request, plan)
    masked = client.masked_input(vector, shares_from_arrays(client.client_id, arrays, outgoing=False))
    _save_client(path, client)
    return reply({**masked_to_arrays(masked), **public}, {"tokens": tokens})


def _unmask(site: Site, request: Request, plan: SecurePlan, arrays: dict) -> Reply:
    path = _client_path(site, request, int(request.config["secagg.instance"]))
    client = _load_client(path)
    answer = client.unmask(request_from_arrays(arrays))
    path.unlink()  # one protocol instance per key pair
    return reply(reply_to_arrays(answer), {"tokens": 0})


STAGES = {"keys": _keys, "share": _share, "mask": _mask, "unmask": _unmask}


@site_task("train.secagg")
def secagg(site: Site, request: Request) -> Reply:
    plan = SecurePlan.from_config(request.config)
    stage = str(request.config["secagg.stage"])
    if stage not in STAGES:
        raise ValueError(f"unknown secure-aggregation stage {stage!r}; known: {sorted(STAGES)}")
    return STAGES[stage](site, request, plan, dict(request.routed or {}))
