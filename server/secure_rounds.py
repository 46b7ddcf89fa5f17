"""Secure aggregation over the Flower Message API: one secure sum = four ``train.secagg`` rounds.

``advertise`` (the site computes and encodes its payload, keeps it on its disk, sends fresh public keys
and the public slot layout), ``share`` (the server routes each site its neighbours' keys; sites send
sealed Shamir shares), ``mask`` (each site gets the shares addressed to it and sends its masked vector),
``unmask`` (survivors send the shares that remove the masks). Every round goes through
``Federation.round`` (bytes counted, malformed replies rejected); a site that fails any round is a
SecAgg dropout and stays out of the federation. The maths is ``fedprune.secure`` (pure).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Message

from fedprune.payload import PayloadError, decode_stats
from fedprune.secure import InvalidMessageError, MaskedInput, SecAggError, SecAggServer, validate_masked_input
from fedprune.secure.codec import (
    decode_stats_vector,
    packed_length,
    slot_sizes,
    stats_vector_length,
    unpack_counts,
)
from fedprune.secure.dp import psd_project
from fedprune.secure.plan import SecurePlan
from fedprune.secure.wire import (
    advert_from_arrays,
    peers_to_arrays,
    reply_from_arrays,
    request_to_arrays,
    shares_from_arrays,
    shares_to_arrays,
)
from fedprune.stats import Stats
from server.rounds import Federation, FederationError, reply_arrays

logger = logging.getLogger(__name__)

MESSAGE_TYPE = "train.secagg"


class SecureAggregationError(FederationError):
    """Secure aggregation cannot finish (fewer than ``threshold`` sites left); nothing is written."""


@dataclass
class SecureSum:
    """The survivors' sum (uint64 residues) and each survivor's public metadata from ``advertise``."""

    total: np.ndarray
    survivors: frozenset[int]
    public: dict[int, Any]


def _tokens(reply: Message) -> int:
    return int(reply.content["metrics"]["tokens"])


def _as_payload_error(node: int, check: Callable[[], Any]) -> Any:
    try:
        return check()
    except InvalidMessageError as error:
        raise PayloadError(error.reason) from error


def secure_sum(
    fed: Federation,
    task: str,
    config: dict,
    update: dict | None,
    plan: SecurePlan,
    public: Callable[[int, Message], Any],
    layout: Callable[[dict[int, Any]], tuple[int, set[int]]],
) -> SecureSum:
    """The sum of the sites' encoded ``task`` payloads; the server never sees one site's vector.

    ``public(node, reply)`` reads the public metadata of an ``advertise`` reply; ``layout(metadata)``
    returns the public vector length and the sites whose metadata agree with it (the others are left out).
    Raises :class:`SecureAggregationError` when fewer than ``plan.threshold`` sites remain.
    """
    base = {**config, **plan.to_config(), "secagg.task": task}

    def stage(name: str) -> dict:
        return {**base, "secagg.stage": name}

    def advertised(node: int, reply: Message):
        return advert_from_arrays(node, reply_arrays(reply)), public(node, reply)

    got = fed.round(MESSAGE_TYPE, stage("advertise"), update, advertised)
    length, accepted = layout({node: meta for node, (_, meta) in got.items()})
    for node in sorted(set(got) - accepted):
        fed.reject(len(fed.round_seconds) - 1, node, "public layout differs from the other sites'")
    server = SecAggServer(length, plan.threshold, None, plan.modulus_bits)
    try:
        peer_keys = server.collect_keys({node: got[node][0] for node in accepted})
        shares = fed.round(
            MESSAGE_TYPE,
            stage("share"),
            None,
            lambda node, reply: shares_from_arrays(node, reply_arrays(reply), outgoing=True),
            nodes=sorted(peer_keys),
            node_arrays={node: peers_to_arrays(keys) for node, keys in peer_keys.items()},
        )
        inboxes = server.route_shares(shares)

        def masked(node: int, reply: Message) -> MaskedInput:
            vector = reply_arrays(reply)["masked"]
            message = MaskedInput(node, vector)
            _as_payload_error(node, lambda: validate_masked_input(node, message, length, plan.modulus_bits))
            return message

        inputs = fed.round(
            MESSAGE_TYPE,
            stage("mask"),
            None,
            masked,
            nodes=sorted(inboxes),
            node_arrays={node: shares_to_arrays(inbox, outgoing=False) for node, inbox in inboxes.items()},
        )
        request = server.collect_masked_inputs(inputs)
        replies = fed.round(
            MESSAGE_TYPE,
            stage("unmask"),
            None,
            lambda node, reply: reply_from_arrays(node, reply_arrays(reply)),
            nodes=sorted(request.survivors),
            node_arrays={node: request_to_arrays(request) for node in request.survivors},
        )
        total = server.reconstruct_sum(replies)
    except SecAggError as error:
        raise SecureAggregationError(
            f"secure aggregation ({task}): {error}; stopping without output"
        ) from error
    for node, reason in sorted(server.rejected.items()):
        logger.warning("secure aggregation left out node %d: %s", node, reason)
    fed.nodes = [node for node in fed.nodes if node in server.survivors]  # dropouts stay dropped
    return SecureSum(total, server.survivors, {node: got[node][1] for node in server.survivors})


def _fixed_length(length: int) -> Callable[[dict[int, Any]], tuple[int, set[int]]]:
    return lambda metadata: (length, set(metadata))


def secure_vote_counts(
    fed: Federation, task: str, config: dict, update: dict | None, plan: SecurePlan, shapes: dict
) -> tuple[dict[str, torch.Tensor], int, dict[int, int]]:
    """Per layer, how many sites kept each weight (exact), the number of sites summed, their tokens."""
    names = sorted(shapes)
    sizes = [int(np.prod(shapes[name])) for name in names]
    length = sum(packed_length(size, plan.max_sites, plan.modulus_bits) for size in sizes)
    result = secure_sum(
        fed, task, config, update, plan, lambda node, reply: _tokens(reply), _fixed_length(length)
    )
    counts, start = {}, 0
    for name, size in zip(names, sizes, strict=True):
        words = packed_length(size, plan.max_sites, plan.modulus_bits)
        flat = unpack_counts(result.total[start : start + words], size, plan.max_sites, plan.modulus_bits)
        counts[name] = torch.from_numpy(flat.astype(np.int32)).reshape(shapes[name])
        start += words
    return counts, len(result.survivors), result.public


def secure_stats(
    fed: Federation,
    config: dict,
    update: dict | None,
    plan: SecurePlan,
    kind: str,
    widths: dict[str, int],
    tokens: dict[int, int],
) -> dict[str, Stats]:
    """The survivors' summed statistics of one block, validated like a plain reply."""
    names = sorted(widths)

    def public(node: int, reply: Message) -> tuple[int, ...]:
        index = reply_arrays(reply)["index"]
        if index.dtype != np.int64 or index.shape != (len(names),):
            raise PayloadError(f"index: expected ({len(names)},) int64")
        sizes = slot_sizes(kind, index.tolist(), [widths[n] for n in names])
        return tuple(index.tolist()) if sizes else ()

    def layout(metadata: dict[int, tuple[int, ...]]) -> tuple[int, set[int]]:
        common, _ = Counter(metadata.values()).most_common(1)[0]
        sizes = slot_sizes(kind, common, [widths[n] for n in names])
        return stats_vector_length(sizes, plan.value_code().words_per_value), {node for node, index in metadata.items() if index == common}

    result = secure_sum(fed, "stats", config, update, plan, public, layout)
    index = next(iter(result.public.values()))
    sizes = slot_sizes(kind, index, [widths[n] for n in names])
    n = len(result.survivors)
    arrays = decode_stats_vector(result.total, sizes, plan.value_code(), plan.count_code(), n)
    if plan.dp_sigma > 0 and kind == "sq_norm":  # post-processing of noisy sums
        arrays = {k: (np.maximum(v, 0.0) if k.startswith("total.") else v) for k, v in arrays.items()}
    arrays["index"] = np.array(index, dtype=np.int64)
    stats = decode_stats(arrays, kind, widths, sum(tokens[node] for node in result.survivors))
    if plan.dp_sigma > 0 and kind == "hessian":
        stats = {k: Stats(s.kind, psd_project(s.total), s.count) for k, s in stats.items()}
    return stats


def plan_from_config(cfg, model: torch.nn.Module) -> SecurePlan | None:
    """The public secure-aggregation plan of a run (``None`` for ``privacy=none``), from the Hydra config
    and the model's shape only."""
    privacy = cfg.get("privacy", {"name": "none"})
    if str(privacy.get("name", "none")) == "none":
        return None
    from fedprune.models import find_blocks, find_prunable_layers
    from fedprune.secure.plan import make_plan

    blocks = find_blocks(model)[1]
    sites = int(cfg.federation.num_clients)
    dp = str(privacy.name) == "secagg_dp"
    return make_plan(
        threshold=int(privacy.threshold)
        if privacy.get("threshold") is not None
        else default_threshold(sites),
        modulus_bits=int(privacy.get("modulus_bits", 64)),
        value_words=int(privacy.get("value_words", 1)),
        max_sites=sites,
        max_tokens=int(cfg.data.calib_windows) * int(cfg.data.seq_len),
        token_bound=float(privacy.token_bound),
        epsilon=float(privacy.epsilon) if dp else None,
        delta=float(privacy.delta) if dp else None,
        seq_len=int(cfg.data.seq_len),
        releases=len(blocks),
        slots=max(len(find_prunable_layers(block)) for block in blocks),
    )


def default_threshold(sites: int) -> int:
    """More than half of the sites (Bonawitz et al.), at least 2."""
    return max(2, sites // 2 + 1)
