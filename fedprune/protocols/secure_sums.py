"""Secure aggregation over a :class:`Federation`: key agreement for all sums first, then rounds per sum.

Each secure sum is one independent protocol instance with its own fresh keys (``fedprune.secure``).
The instances' first two steps do not depend on the payload, so they run for all the run's sums at
once (:func:`prepare_sums`): ``keys`` (every site sends fresh public keys for each instance) and
``share`` (the server routes each site its neighbours' keys; sites send sealed Shamir shares). Then
each sum takes two rounds (:func:`secure_sum`): ``mask`` (the site gets the shares addressed to it and
the block's update, computes and encodes its payload, sends it masked with the public slot layout)
and ``unmask`` (survivors send the shares that remove the masks). With a roster (``privacy.roster``:
the sites' pinned identity public keys) every advert is signed and checked by the server and by every
site, and a third round, ``consistency``, runs between ``mask`` and ``unmask``: each survivor signs the
survivor set, and a site unmasks only with ``threshold`` valid signatures of the set it was told.
Every round goes through ``Federation.round`` (bytes counted, malformed replies rejected); a site that
fails any round is a SecAgg dropout and stays out of the federation (later instances recover its
pairwise masks as a dropout's), and so is a site whose sealed share a neighbour could not open (the
neighbour names it in its ``mask`` reply). The maths is ``fedprune.secure`` (pure).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedprune.config import JobConfig
from fedprune.payload import PayloadError, decode_stats
from fedprune.protocols.federation import Federation, FederationError, Reply
from fedprune.protocols.messages import SiteJob, reply_tokens
from fedprune.secure import InvalidMessageError, MaskedInput, SecAggError, SecAggServer, validate_masked_input
from fedprune.secure.codec import (
    decode_stats_vector,
    packed_length,
    slot_sizes,
    stats_vector_length,
    unpack_counts,
)
from fedprune.secure.identity import Roster, load_roster
from fedprune.secure.messages import EncryptedShare, KeyAdvert
from fedprune.secure.plan import SecurePlan
from fedprune.secure.wire import (
    advert_from_arrays,
    instance_arrays,
    masked_from_arrays,
    peers_to_arrays,
    prefixed,
    reply_from_arrays,
    request_to_arrays,
    shares_from_arrays,
    shares_to_arrays,
    signature_from_arrays,
    signatures_to_arrays,
)
from fedprune.stats import Stats

logger = logging.getLogger(__name__)

MESSAGE_TYPE = "train.secagg"


class SecureAggregationError(FederationError):
    """Secure aggregation cannot finish (fewer than ``threshold`` sites left); nothing is written."""


TOKEN_WORDS = 1  # every masked vector ends with the site's token count (``plan.count_code()``)


@dataclass
class SecureSum:
    """The survivors' sum of payloads (uint64 residues, the token word removed), the survivors, each
    survivor's public metadata from ``mask`` and the survivors' total tokens (only the total is revealed)."""

    total: np.ndarray
    survivors: frozenset[int]
    public: dict[int, Any]
    tokens: int
    dp_rho: dict[int, float] = field(default_factory=dict)  # DP: rho each site says its mask reply spent


@dataclass
class PreparedSum:
    """One protocol instance after key agreement: ready for a ``mask`` and an ``unmask`` round."""

    instance: int  # the sites keep this instance's secrets under this number
    server: SecAggServer
    inboxes: dict[int, dict[int, EncryptedShare]]  # receiver -> {sender: sealed shares}


def reply_dp_rho(metrics: dict, plan: SecurePlan) -> float | None:
    """The zCDP ``rho`` a site reports for its DP release (``dp_rho``): a finite number >= 0, required
    when the plan adds noise (``ValueError`` otherwise, so the reply is rejected); None without DP."""
    if not plan.dp_sigma > 0:
        return None
    value = metrics.get("dp_rho")
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value) or value < 0:
        raise ValueError(f"dp_rho: expected a finite number >= 0, got {value!r}")
    return float(value)


@contextmanager
def _stop_on_protocol_error(what: str) -> Iterator[None]:
    """Turn the protocol's ``SecAggError`` into a ``SecureAggregationError`` (the run stops, no output)."""
    try:
        yield
    except SecAggError as error:
        raise SecureAggregationError(
            f"secure aggregation ({what}): {error}; stopping without output"
        ) from error


def _stage(
    fed: Federation,
    base: dict,
    stage: str,
    parse: Callable[[int, Reply], Any],
    update: dict | None = None,
    nodes: list[int] | None = None,
    node_arrays: dict[int, dict] | None = None,
) -> dict[int, Any]:
    """One ``train.secagg`` round of protocol step ``stage``."""
    return fed.round(MESSAGE_TYPE, {**base, "secagg.stage": stage}, update, parse, nodes, node_arrays)


def _auth_config(roster: Roster | None) -> dict:
    """Tells the sites whether adverts are signed (a site with an identity refuses unsigned runs)."""
    return {"secagg.authenticated": roster is not None}


def prepare_sums(
    fed: Federation, config: dict, plan: SecurePlan, first: int, count: int, roster: Roster | None = None
) -> list[PreparedSum]:
    """Key agreement for instances ``first .. first + count - 1`` in two rounds (``keys``, ``share``).

    A site whose keys or shares are malformed for any instance (with ``roster``: an advert not signed by
    a roster identity of its own) is left out of all of them and of the federation. Raises
    :class:`SecureAggregationError` when fewer than ``plan.threshold`` sites remain.
    """
    instances = range(first, first + count)
    base = {
        **config,
        **plan.to_config(),
        **_auth_config(roster),
        "secagg.first": first,
        "secagg.count": count,
    }
    auth = {} if roster is None else {"roster": roster, "run": SiteJob.from_record(config).run_key}

    def adverts(node: int, reply: Reply) -> dict[int, KeyAdvert]:
        arrays = reply.arrays
        return {k: advert_from_arrays(node, instance_arrays(arrays, k)) for k in instances}

    def bundles(node: int, reply: Reply) -> dict[int, dict[int, EncryptedShare]]:
        arrays = reply.arrays
        return {k: shares_from_arrays(node, instance_arrays(arrays, k), outgoing=True) for k in instances}

    with _stop_on_protocol_error("key agreement"):
        got = _stage(fed, base, "keys", adverts)
        servers = {
            k: SecAggServer(None, plan.threshold, None, plan.modulus_bits, **auth, instance=k)
            for k in instances
        }
        peers = {k: servers[k].collect_keys({node: got[node][k] for node in got}) for k in instances}
        nodes = sorted(set.intersection(*(set(p) for p in peers.values())))
        node_arrays = {
            node: {
                key: a for k in instances for key, a in prefixed(peers_to_arrays(peers[k][node]), k).items()
            }
            for node in nodes
        }
        shares = _stage(fed, base, "share", bundles, nodes=nodes, node_arrays=node_arrays)
        inboxes = {k: servers[k].route_shares({node: shares[node][k] for node in shares}) for k in instances}
    ready = set.intersection(*(set(inbox) for inbox in inboxes.values()))
    for k in instances:
        for node, reason in sorted(servers[k].rejected.items()):
            fed.reject(len(fed.round_seconds) - 1, node, f"secure aggregation instance {k}: {reason}")
    fed.nodes = [node for node in fed.nodes if node in ready]  # dropouts stay dropped
    return [PreparedSum(k, servers[k], inboxes[k]) for k in instances]


def secure_sum(
    fed: Federation,
    prepared: PreparedSum,
    task: str,
    config: dict,
    update: dict | None,
    plan: SecurePlan,
    public: Callable[[int, Reply], Any],
    layout: Callable[[dict[int, Any]], tuple[int, set[int]]],
) -> SecureSum:
    """The sum of the sites' encoded ``task`` payloads; the server never sees one site's vector.

    ``public(node, reply)`` reads the public metadata of a ``mask`` reply; ``layout(metadata)`` returns
    the public payload length and the sites whose metadata agree with it (the others are left out). Each
    vector carries :data:`TOKEN_WORDS` more: the site's token count, so only the survivors' total tokens
    are revealed (checked against the public bound ``plan.max_tokens`` per survivor).
    Authenticated (the server has a roster): ``mask``, ``consistency``, ``unmask``. Raises
    :class:`SecureAggregationError` when fewer than ``plan.threshold`` sites remain.
    """
    server = prepared.server
    base = {
        **config,
        **plan.to_config(),
        **_auth_config(server.roster),
        "secagg.task": task,
        "secagg.instance": prepared.instance,
    }
    nodes = sorted(node for node in prepared.inboxes if node in fed.nodes)

    def masked(node: int, reply: Reply) -> tuple[Any, MaskedInput, float | None]:
        reply_tokens(reply.metrics, config)  # a well-formed count (0: the tokens travel masked)
        return public(node, reply), masked_from_arrays(node, reply.arrays), reply_dp_rho(reply.metrics, plan)

    with _stop_on_protocol_error(task):
        inboxes = {node: shares_to_arrays(prepared.inboxes[node], outgoing=False) for node in nodes}
        got = _stage(fed, base, "mask", masked, update, nodes, inboxes)
        number = len(fed.round_seconds) - 1
        length, accepted = layout({node: meta for node, (meta, _, _) in got.items()})
        length += TOKEN_WORDS
        inputs = {}
        for node, (_, message, _) in sorted(got.items()):
            try:
                if node not in accepted:
                    raise InvalidMessageError(node, "public layout differs from the other sites'")
                validate_masked_input(node, message, length, plan.modulus_bits)
            except InvalidMessageError as error:
                fed.reject(number, node, error.reason)
                continue
            inputs[node] = message
        before = set(server.rejected)
        request = server.collect_masked_inputs(inputs, vector_length=length)
        for node in sorted(set(server.rejected) - before):  # complaints: the accused, bad complainers
            fed.reject(number, node, server.rejected[node])
        survivors = sorted(request.survivors)
        requests = {node: request_to_arrays(request) for node in survivors}
        if server.roster is not None:
            survivors, requests = _consistency(fed, base, server, survivors, requests)
        replies = _stage(
            fed,
            base,
            "unmask",
            lambda node, reply: reply_from_arrays(node, reply.arrays),
            None,
            survivors,
            requests,
        )
        total = server.reconstruct_sum(replies)
    for node, reason in sorted(server.rejected.items()):
        logger.warning("secure aggregation left out node %d: %s", node, reason)
    fed.nodes = [node for node in fed.nodes if node in server.survivors]  # dropouts stay dropped
    tokens = summed_tokens(total[-TOKEN_WORDS:], len(server.survivors), plan, task)
    public_of = {node: got[node][0] for node in server.survivors}
    spent = {node: rho for node, (_, _, rho) in got.items() if rho is not None}  # sent: spent, used or not
    return SecureSum(total[:-TOKEN_WORDS], server.survivors, public_of, tokens, spent)


def summed_tokens(words: np.ndarray, survivors: int, plan: SecurePlan, task: str) -> int:
    """The survivors' total tokens from the summed token word; beyond the public bound
    (``survivors · plan.max_tokens``) or negative, some site sent a corrupt count: the run stops."""
    tokens = int(plan.count_code().decode_sum(words, survivors)[0])
    if not 0 <= tokens <= survivors * plan.max_tokens:
        raise SecureAggregationError(
            f"secure sum of {task!r}: {tokens} tokens from {survivors} sites is outside [0, "
            f"{survivors} x {plan.max_tokens}] (a site sent a corrupt count); stopping without output"
        )
    return tokens


def _consistency(
    fed: Federation, base: dict, server: SecAggServer, survivors: list[int], requests: dict[int, dict]
) -> tuple[list[int], dict[int, dict]]:
    """The consistency round: survivors sign the survivor set; the signers, and their unmask requests
    (the survivor set and every valid signature)."""
    signed = _stage(
        fed,
        base,
        "consistency",
        lambda node, reply: signature_from_arrays(node, reply.arrays),
        None,
        survivors,
        requests,
    )
    before = set(server.rejected)
    forwarded = server.collect_signatures(signed)
    for node in sorted(set(server.rejected) - before):
        fed.reject(len(fed.round_seconds) - 1, node, server.rejected[node])
    signatures = signatures_to_arrays(forwarded)
    signers = sorted(forwarded)
    return signers, {node: {**requests[node], **signatures} for node in signers}


def roster_from_job(job: JobConfig) -> Roster | None:
    """The pinned identity public keys of the run's sites (``privacy.roster``), or ``None``."""
    path = job.privacy.roster
    return None if path is None or job.privacy.name == "none" else load_roster(path)


def _fixed_length(length: int) -> Callable[[dict[int, Any]], tuple[int, set[int]]]:
    return lambda metadata: (length, set(metadata))


def check_counts(counts: np.ndarray, survivors: int, name: str) -> None:
    """Summed 0/1 votes lie in [0, survivors]; a larger one means some site sent a vector that is not a
    vote (the sum cannot say whose): the run stops rather than vote on corrupt counts."""
    if counts.size and int(counts.max()) > survivors:
        raise SecureAggregationError(
            f"secure vote sum of {name!r}: a count of {int(counts.max())} from {survivors} sites (a site sent "
            "something other than 0/1 votes); stopping without output"
        )


def secure_vote_counts(
    fed: Federation,
    prepared: PreparedSum,
    task: str,
    config: dict,
    update: dict | None,
    plan: SecurePlan,
    shapes: dict,
) -> tuple[dict[str, torch.Tensor], frozenset[int], int]:
    """Per layer, how many sites kept each weight (exact), the sites summed, their total tokens."""
    names = sorted(shapes)
    sizes = [int(np.prod(shapes[name])) for name in names]
    length = sum(packed_length(size, plan.max_sites, plan.modulus_bits) for size in sizes)
    result = secure_sum(
        fed,
        prepared,
        task,
        config,
        update,
        plan,
        lambda node, reply: None,
        _fixed_length(length),
    )
    counts, start = {}, 0
    for name, size in zip(names, sizes, strict=True):
        words = packed_length(size, plan.max_sites, plan.modulus_bits)
        flat = unpack_counts(result.total[start : start + words], size, plan.max_sites, plan.modulus_bits)
        check_counts(flat, len(result.survivors), name)
        counts[name] = torch.from_numpy(flat.astype(np.int32)).reshape(shapes[name])
        start += words
    return counts, result.survivors, result.tokens


def secure_stats(
    fed: Federation,
    prepared: PreparedSum,
    config: dict,
    update: dict | None,
    plan: SecurePlan,
    kind: str,
    widths: dict[str, int],
) -> tuple[dict[str, Stats], SecureSum]:
    """The survivors' summed statistics of one block, validated like a plain reply (counts at most the
    summed tokens); the secure sum they came from (its survivors, their total tokens, the ``rho`` each
    site that sent a DP release reported)."""
    names = sorted(widths)

    def public(node: int, reply: Reply) -> tuple[int, ...]:
        index = reply.arrays["index"]
        if index.dtype != np.int64 or index.shape != (len(names),):
            raise PayloadError(f"index: expected ({len(names)},) int64")
        sizes = slot_sizes(kind, index.tolist(), [widths[n] for n in names])
        return tuple(index.tolist()) if sizes else ()

    def layout(metadata: dict[int, tuple[int, ...]]) -> tuple[int, set[int]]:
        common, _ = Counter(metadata.values()).most_common(1)[0]
        sizes = slot_sizes(kind, common, [widths[n] for n in names])
        return stats_vector_length(sizes, plan.value_code()), {
            node for node, index in metadata.items() if index == common
        }

    result = secure_sum(fed, prepared, "stats", config, update, plan, public, layout)
    index = next(iter(result.public.values()))
    sizes = slot_sizes(kind, index, [widths[n] for n in names])
    n = len(result.survivors)
    arrays = decode_stats_vector(result.total, sizes, plan.value_code(), plan.count_code(), n)
    arrays["index"] = np.array(index, dtype=np.int64)
    # noisy sums (DP) are post-processed by their kind (clamp at 0 / PSD projection), then validated
    stats = decode_stats(arrays, kind, widths, result.tokens, noisy=plan.dp_sigma > 0)
    return stats, result


def plan_from_job(job: JobConfig, model: torch.nn.Module) -> SecurePlan | None:
    """The public secure-aggregation plan of a run (``None`` for ``privacy=none``), from the job and the
    model's shape only."""
    privacy = job.privacy
    if privacy.name == "none":
        return None
    from fedprune.config import build_pruner
    from fedprune.models import find_prunable_layers, named_blocks
    from fedprune.secure.plan import make_plan

    blocks = named_blocks(model)
    sites = job.federation.num_clients
    dp = privacy.name == "secagg_dp"
    layers = [len(find_prunable_layers(block, job.ignore, prefix)) for prefix, block in blocks]
    rule = job.allocation.rule()  # a non-uniform rule releases every dense block's statistics first
    return make_plan(
        threshold=privacy.threshold if privacy.threshold is not None else default_threshold(sites),
        modulus_bits=privacy.modulus_bits,
        value_words=privacy.value_words,
        max_sites=sites,
        max_tokens=job.data.calib_windows * job.data.seq_len,
        token_bound=privacy.token_bound,
        epsilon=privacy.epsilon if dp else None,
        delta=privacy.delta if dp else None,
        seq_len=job.data.seq_len,
        releases=len(blocks),
        slots=max(layers),
        stat_kind=build_pruner(job.pruner).stat_kind if dp else None,
        dense_slots=sum(layers) if rule is not None else 0,
        dense_kind=rule.dense_stat_kind if rule is not None else None,
    )


def default_threshold(sites: int) -> int:
    """More than half of the sites (Bonawitz et al.), at least 2."""
    return max(2, sites // 2 + 1)
