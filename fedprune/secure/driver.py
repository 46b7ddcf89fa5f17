"""An in-process driver that plays the server's message routing between party objects (for tests).

``run_secure_sum`` creates one ``SecAggClient`` per input and a ``SecAggServer``, then runs the four
rounds (five with ``identities``: the consistency round) exactly as a networked server would: each
round collects the clients' messages, hands them to the server, and delivers the server's replies. Every
message the server receives is recorded in the transcript, so tests can inspect everything the server
ever saw. ``router`` sees every message on its way to a client and may replace it: tests play an active
network attacker or a malicious server with it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedprune.secure.client import SecAggClient
from fedprune.secure.identity import Roster, identity_public
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
    aborted: dict[int, str] = field(default_factory=dict)  # client -> why it stopped (SecAggError)


Router = Callable[[str, int, object], object]  # (round, receiver, message) -> the message delivered


def _honest(round_name: str, receiver: int, message: object) -> object:
    return message


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
    identities: Mapping[int, Ed25519PrivateKey] | None = None,
    roster: Roster | None = None,
    run: str = "run",
    instance: int = 0,
    router: Router = _honest,
    transcript: list[ReceivedMessage] | None = None,
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
    identities : ``{client_id: Ed25519 identity}``: authenticate (signed adverts, consistency round).
    roster : the pinned identity public keys; default: those of ``identities``.
    run, instance : what the signatures are bound to.
    router : ``(round, receiver, message) -> message`` delivered (rounds ``peer_keys``, ``shares``,
        ``request``, ``signatures``); default: deliver as the server sent it.
    transcript : a list to record the server's received messages in (kept when the run raises).
    """
    length = _vector_length(client_vectors, vector_length)
    transcript = [] if transcript is None else transcript
    aborted: dict[int, str] = {}
    if identities is not None and roster is None:
        roster = frozenset(identity_public(key) for key in identities.values())

    def randomness(client: int):
        return os.urandom if seed is None else seeded_random_bytes(seed, client)

    def client(u: int) -> SecAggClient:
        if identities is None:
            return SecAggClient(u, modulus_bits, randomness(u))
        auth = dict(identity=identities[u], roster=roster, run=run, instance=instance)
        return SecAggClient(u, modulus_bits, randomness(u), **auth)

    clients = {u: client(u) for u in sorted(client_vectors)}
    auth = {} if identities is None else dict(roster=roster, run=run, instance=instance)
    server = SecAggServer(length, threshold, neighbours, modulus_bits, **auth)

    def receive(round_name: str, messages: dict[int, object]) -> dict[int, object]:
        transcript.extend(ReceivedMessage(round_name, u, m) for u, m in messages.items())
        return messages

    def each(step: str, alive: Collection[int], act: Callable[[int], object]) -> dict[int, object]:
        """``act(u)`` for every live client; one that aborts (``SecAggError``) sends nothing."""
        out = {}
        for u in alive:
            try:
                out[u] = act(u)
            except SecAggError as error:
                logger.warning("client %d aborted at %s: %s", u, step, error)
                aborted[u] = str(error)
        return out

    adverts = receive("advertise_keys", {u: c.advertise_keys() for u, c in clients.items()})
    peer_keys = {u: router("peer_keys", u, m) for u, m in server.collect_keys(adverts).items()}

    alive = [u for u in peer_keys if u not in drop_before_sharing]
    shares = each("share_keys", alive, lambda u: clients[u].share_keys(peer_keys[u], threshold))
    inboxes = {
        u: router("shares", u, m) for u, m in server.route_shares(receive("share_keys", shares)).items()
    }

    alive = [u for u in inboxes if u not in drop_before_masking]
    masked = each("masked_input", alive, lambda u: clients[u].masked_input(client_vectors[u], inboxes[u]))
    request = server.collect_masked_inputs(receive("masked_input", masked))
    requests = {u: router("request", u, request) for u in sorted(request.survivors)}

    signatures: dict[int, object] = {}
    if identities is not None:
        signed = each("consistency", requests, lambda u: clients[u].check_consistency(requests[u]))
        forwarded = server.collect_signatures(receive("consistency", signed))
        signatures = {u: router("signatures", u, forwarded) for u in sorted(forwarded)}

    asked = signatures if identities is not None else requests  # authenticated: only the signers
    alive = [u for u in asked if u not in drop_after_masking]
    replies = each("unmask", alive, lambda u: clients[u].unmask(requests[u], signatures.get(u)))
    total = server.reconstruct_sum(receive("unmask", replies))
    return SecureSumResult(
        total, server.survivors, server.dropped, dict(server.rejected), transcript, aborted
    )
