"""An in-process driver that plays the server's message routing between party objects (for tests).

``run_secure_sum`` creates one ``SecAggClient`` per input and a ``SecAggServer``, then runs the four
rounds exactly as a networked server would: each round collects the clients' messages, hands them to
the server, and delivers the server's replies. Every message the server receives is recorded in the
transcript, so tests can inspect everything the server ever saw.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedprune.secure.client import SecAggClient
from fedprune.secure.messages import SecAggError
from fedprune.secure.primitives import seeded_random_bytes
from fedprune.secure.server import SecAggServer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReceivedMessage:
    """One message as the server received it: the round, the sender, the payload."""

    round: str
    sender: int
    message: object


@dataclass(frozen=True)
class SecureSumResult:
    """The survivors' sum (uint64 residues mod 2^k) and what the server saw on the way."""

    total: np.ndarray  # (length,) uint64
    survivors: frozenset[int]
    dropped: frozenset[int]
    rejected: dict[int, str]
    transcript: list[ReceivedMessage] = field(repr=False)


def _vector_length(client_vectors: Mapping[int, np.ndarray], vector_length: int | None) -> int:
    if vector_length is not None:
        return vector_length
    lengths = {len(v) for v in client_vectors.values()}
    if len(lengths) != 1:
        raise ValueError(f"inputs have lengths {sorted(lengths)}; pass vector_length explicitly")
    return lengths.pop()


def run_secure_sum(
    client_vectors: Mapping[int, np.ndarray],
    threshold: int,
    drop_after_masking: Collection[int] = frozenset(),
    drop_before_masking: Collection[int] = frozenset(),
    seed: int | None = None,
    *,
    drop_before_sharing: Collection[int] = frozenset(),
    vector_length: int | None = None,
    neighbours: Mapping[int, Collection[int]] | None = None,
    modulus_bits: int = 64,
) -> SecureSumResult:
    """Securely sum encoded client vectors (uint64 residues mod 2^k) by routing protocol messages.

    Parameters
    ----------
    client_vectors : ``{client_id: (length,) uint64}`` encoded inputs.
    threshold : Shamir threshold t (>= 2); at least t clients must survive every round.
    drop_after_masking : clients that send their masked input, then never answer the unmask request.
    drop_before_masking : clients that share keys, then never send a masked input.
    seed : None for OS randomness; an int for deterministic keys and masks (tests only).
    drop_before_sharing : clients that advertise keys, then vanish.
    vector_length : the public length; default: the common length of all inputs.
    neighbours : public communication graph (``graph.ring_graph``); default: complete graph.
    modulus_bits : k, inputs and sum are modulo 2^k.
    """
    length = _vector_length(client_vectors, vector_length)
    transcript: list[ReceivedMessage] = []

    def randomness(client: int):
        return os.urandom if seed is None else seeded_random_bytes(seed, client)

    clients = {u: SecAggClient(u, modulus_bits, randomness(u)) for u in sorted(client_vectors)}
    server = SecAggServer(length, threshold, neighbours, modulus_bits)

    def receive(round_name: str, messages: dict[int, object]) -> dict[int, object]:
        transcript.extend(ReceivedMessage(round_name, u, m) for u, m in messages.items())
        return messages

    adverts = receive("advertise_keys", {u: c.advertise_keys() for u, c in clients.items()})
    peer_keys = server.collect_keys(adverts)

    alive = [u for u in peer_keys if u not in drop_before_sharing]
    shares = receive("share_keys", {u: clients[u].share_keys(peer_keys[u], threshold) for u in alive})
    inboxes = server.route_shares(shares)

    alive = [u for u in inboxes if u not in drop_before_masking]
    masked = {}
    for u in alive:
        try:
            masked[u] = clients[u].masked_input(client_vectors[u], inboxes[u])
        except SecAggError as error:  # an aborting client sends nothing, like a dropout
            logger.warning("client %d aborted before masking: %s", u, error)
    request = server.collect_masked_inputs(receive("masked_input", masked))

    alive = [u for u in sorted(request.survivors) if u not in drop_after_masking]
    replies = {}
    for u in alive:
        try:
            replies[u] = clients[u].unmask(request)
        except SecAggError as error:
            logger.warning("client %d refused to unmask: %s", u, error)
    total = server.reconstruct_sum(receive("unmask", replies))
    return SecureSumResult(total, server.survivors, server.dropped, dict(server.rejected), transcript)
