"""The site's side of secure aggregation (``train.secagg``): wraps any summed task's payload.

Each secure sum is one protocol instance (a number) with fresh keys; ``secagg.stage`` says which step
(see ``fedprune/protocols/secure_sums.py``): ``keys`` and ``share`` run the first two steps for instances
``secagg.first .. + secagg.count - 1`` at once; ``mask`` (instance ``secagg.instance``) computes the
plain payload of ``secagg.task`` (any entry of :data:`fedprune.protocols.llm_site.PAYLOADS`), encodes it
as one uint64 vector with the public codes of the plan, adds its share of DP noise (``secagg_dp``) and
sends it masked, with its token count as the vector's last word (the server learns only the total);
``consistency`` (authenticated runs) signs the survivor set; ``unmask`` answers the server's request.
Each instance's secrets stay on this site's disk, one file per instance (each message may run in a
fresh process), deleted after ``unmask``. Masks are never reused across sums.

Before any stage the site checks the plan against its own floors (:mod:`site_policy`, from its node
config) and refuses with a :class:`~fedprune.protocols.site_policy.PolicyError`. A DP release (``mask``
of statistics with ``dp_sigma > 0``) is priced by the site itself: ``rho`` of the Gaussian mechanism
for the sensitivity of what it releases (its ``seq_len``, the number of statistic slots, the plan's
clip) and the plan's noise std; it must meet the site's ``dp_sigma`` floor and is recorded in the
site's ledger (:mod:`dp_ledger`) before the noise is even drawn; the reply reports it (``dp_rho``).

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

from fedprune.allocation_rules import get_allocation_rule
from fedprune.data.assets import cache_root, resolve_corpus_path
from fedprune.models import find_blocks, find_prunable_layers
from fedprune.owl import OwlSpec
from fedprune.protocols.dp_ledger import BudgetError, DPLedger, data_fingerprint
from fedprune.protocols.federation import Reply, Request
from fedprune.protocols.llm_site import PAYLOADS, Payload, site_model
from fedprune.protocols.messages import BlockTask, MethodSpec, SiteJob
from fedprune.protocols.site_policy import PolicyError, SitePolicy, release_rho, release_sensitivity
from fedprune.protocols.site_state import reserve_instances, state_dir
from fedprune.protocols.tasks import Site, reply, site_task
from fedprune.secure import SecAggClient
from fedprune.secure.codec import encode_stats_vector, pack_votes
from fedprune.secure.dp import composed_sensitivity, site_noise
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
        for key in _slots(arrays):
            arrays[key] = arrays[key] + site_noise(arrays[key].shape, plan.dp_sigma, plan.threshold, rng)
    return encode_stats_vector(arrays, plan.value_code(), plan.count_code())


def _slots(arrays: dict) -> list[str]:
    """The statistic slots of an ``encode_stats`` payload (what DP noise covers)."""
    return [k for k in arrays if k.startswith("total.")]


def site_policy(site: Site) -> SitePolicy:
    """This site's floors, from its node config."""
    return SitePolicy.from_node_config(site.node_config)


def ledger_of(site: Site, policy: SitePolicy) -> DPLedger:
    """This site's DP ledger: node config ``dp-ledger``, default ``<cache>/dp_ledger/<site key>.json``."""
    return DPLedger(policy.ledger or cache_root() / "dp_ledger" / f"{site.key}.json")


def site_data_fingerprint(site: Site, job: SiteJob) -> str:
    """The fingerprint of the works this site draws its windows from (``data-path``, or the corpus)."""
    node = site.node_config
    folder = node["data-path"] if "data-path" in node else resolve_corpus_path(job.corpus)
    return data_fingerprint(folder)


def release_kind(config) -> str:
    """The statistic a ``stats`` release carries: the block task's (``dense``) or the method's; tasks
    without a DP sensitivity (``influence``) are refused."""
    task = BlockTask.from_record(config)
    if task.task == "dense":
        return task.stat_kind
    if task.task != "stats":
        raise PolicyError(f"site policy refuses a DP release of task {task.task!r}: it has no DP sensitivity")
    return MethodSpec.from_record(config).stat_kind


def _sensitivity(plan: SecurePlan, config, slots: int) -> float:
    """The sensitivity of this release (``slots`` statistics of the task's kind)."""
    return _kind_sensitivity(plan, SiteJob.from_record(config).seq_len, slots, release_kind(config))


def run_sensitivity(plan: SecurePlan, config) -> float:
    """The L2 sensitivity of all of a run's DP releases composed (``dp.composed_sensitivity``), from this
    site's own model: one release per block of at most S statistics of the method's kind (S: the most
    prunable layers in a block), plus, with a non-uniform allocation (OWL), one release of every dense
    layer's statistics of the rule's kind: the same composition the server calibrates its noise for."""
    job, method = SiteJob.from_record(config), MethodSpec.from_record(config)
    blocks_name, blocks = find_blocks(site_model(job))
    layers = [len(find_prunable_layers(b, job.ignore, f"{blocks_name}.{i}")) for i, b in enumerate(blocks)]
    kind = method.stat_kind
    parts = [_kind_sensitivity(plan, job.seq_len, max(layers), kind)] * len(layers)
    if method.allocation != "uniform":
        rule = get_allocation_rule(method.allocation, OwlSpec(method.owl_m, method.owl_lambda))
        parts.append(_kind_sensitivity(plan, job.seq_len, sum(layers), rule.dense_stat_kind))
    return composed_sensitivity(parts)


def _kind_sensitivity(plan: SecurePlan, seq_len: int, slots: int, kind: str) -> float:
    try:
        return release_sensitivity(plan, seq_len, slots, kind)
    except (KeyError, ValueError) as error:
        raise PolicyError(f"site policy refuses a DP release of {kind!r} statistics: {error}") from None


def _check_dp_plan(site: Site, request: Request, plan: SecurePlan, policy: SitePolicy) -> None:
    """Before any stage of a DP run: the noise meets this site's floor for the whole run's releases."""
    if policy.requires_dp and plan.dp_sigma > 0:
        policy.check_sigma(plan, run_sensitivity(plan, request.config), 1)


def _charge_release(site: Site, request: Request, plan: SecurePlan, arrays: dict) -> dict:
    """Price this DP release, check it against the floor and the budget, record it; reply metrics."""
    policy = site_policy(site)
    sensitivity = _sensitivity(plan, request.config, len(_slots(arrays)))
    policy.check_sigma(plan, run_sensitivity(plan, request.config), 1)
    rho = release_rho(plan, sensitivity)
    job = SiteJob.from_record(request.config)
    spent = ledger_of(site, policy).charge(site_data_fingerprint(site, job), rho, policy.budget)
    return {"dp_rho": rho, "dp_rho_total": spent.rho}


def _payload(site: Site, request: Request, plan: SecurePlan) -> tuple[np.ndarray, dict, dict]:
    """This site's encoded vector (its token count in the last word: only the sum is revealed), its
    public metadata arrays and its DP metrics."""
    task = str(request.config["secagg.task"])
    if task not in PAYLOADS:
        raise ValueError(f"unknown secure-aggregation task {task!r}; known: {sorted(PAYLOADS)}")
    bound = plan.token_bound if plan.dp_sigma > 0 else None
    payload: Payload = PAYLOADS[task](site, request, token_bound=bound)
    tokens = plan.count_code().encode(np.array([payload.tokens], dtype=np.int64))  # (TOKEN_WORDS,)
    if payload.kind == "stats":
        arrays = payload.values
        dp = _charge_release(site, request, plan, arrays) if plan.dp_sigma > 0 else {}  # before any noise
        return np.concatenate([_stats_vector(arrays, plan), tokens]), {"index": arrays["index"]}, dp
    if site_policy(site).requires_dp:
        raise PolicyError(
            f"site policy refuses to release {payload.kind!r} without DP (dp-max-epsilon is set)"
        )
    return np.concatenate([_votes_vector(payload.values, plan), tokens]), {}, {}


def _keys(site: Site, request: Request, plan: SecurePlan, arrays: dict, creds: Credentials | None) -> Reply:
    instances = _instances(request.config)  # refused if any number was keyed here before (a resumed run)
    run = SiteJob.from_record(request.config).run_key
    reserve_instances(run, site.key, instances.start, len(instances))
    out = {}
    identity, roster = (None, None) if creds is None else creds
    for k in instances:
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
        peers = peers_from_arrays(instance_arrays(arrays, k))
        site_policy(site).check_neighbours(plan, len(peers))
        shares = client.share_keys(peers, plan.threshold)
        out.update(prefixed(shares_to_arrays(shares, outgoing=True), k))
        _save_client(path, client)
    return reply(out, {"tokens": 0})


def _mask(site: Site, request: Request, plan: SecurePlan, arrays: dict, creds: Credentials | None) -> Reply:
    path = _client_path(site, request, int(request.config["secagg.instance"]))
    client = _load_client(path, creds)
    vector, public, dp = _payload(site, request, plan)
    masked = client.masked_input(vector, shares_from_arrays(client.client_id, arrays, outgoing=False))
    _save_client(path, client)
    return reply({**masked_to_arrays(masked), **public}, {"tokens": 0, **dp})  # tokens: in the vector


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
    unmask = request_from_arrays(arrays)
    unknown = (set(unmask.survivors) | set(unmask.dropped)) - client.neighbours - {client.client_id}
    if unknown:  # the complete graph: every site in a sum is a neighbour
        raise PolicyError(
            f"site policy refuses to unmask: survivors/dropped {sorted(unknown)} are not neighbours"
        )
    signatures = signatures_from_arrays(arrays) if client.authenticated else None
    try:
        answer = client.unmask(unmask, signatures)
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
    policy = site_policy(site)
    try:
        policy.check_plan(plan)
        _check_dp_plan(site, request, plan, policy)
        credentials = site_credentials(site, bool(request.config.get("secagg.authenticated", False)))
        return STAGES[stage](site, request, plan, dict(request.routed or {}), credentials)
    except (PolicyError, BudgetError) as error:  # the server sees the same reason as a client error
        logger.warning("site %s refuses secure-aggregation stage %s: %s", site.key, stage, error)
        raise
