"""The server party of secure aggregation: routes messages and recovers only the sum of the inputs.

Client sets, as in Bonawitz et al. (2017): U1 advertised keys, U2 ⊆ U1 shared keys, U3 ⊆ U2 sent a
valid masked input (the *survivors*); ``dropped = U2 \\ U3``. The result is Σ_{u in U3} x_u mod 2^k.
For each survivor u the server reconstructs ``b_u`` from ``threshold`` shares and removes ``PRG(b_u)``;
for each dropped v it reconstructs ``s_v^SK`` and removes the pairwise masks its surviving neighbours
added for v. The masks between two survivors cancel. A client whose message is malformed is excluded
(recorded in ``rejected``) exactly like a client that dropped out at that step.

Complaints: a client whose share to a neighbour u fails to open is named in u's masked input; u did not
mask with it. Every client so named is dropped (its input, if any, discarded), and its pairwise masks
are removed only for the survivors that masked with it. A complaint naming anything but a neighbour
that shared keys with the complainer invalidates the complainer's message.

With a roster (the pinned identity public keys of all sites; ``identity``), an advert is accepted only
if it is signed by a roster identity that no other advert uses, and a consistency round runs between
the masked inputs and the unmasking: each survivor signs the survivor set, the server checks and
forwards the signatures, and only the signers are asked to unmask (``collect_signatures``). The clients
check the same signatures themselves; the server's checks only keep a faulty client from stopping the
others. The authenticated protocol uses the complete graph: one survivor set is signed by all.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Collection, Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedprune.secure.client import mask_sign, share_point
from fedprune.secure.encoding import check_modulus_bits, modulus_mask, reduce_
from fedprune.secure.graph import Graph, check_graph, complete_graph, restrict
from fedprune.secure.identity import Roster, verify_advert, verify_survivors
from fedprune.secure.messages import (
    EncryptedShare,
    InvalidMessageError,
    KeyAdvert,
    MaskedInput,
    SecAggError,
    SurvivorSignature,
    TooFewSurvivorsError,
    UnmaskReply,
    UnmaskRequest,
)
from fedprune.secure.primitives import (
    KEY_BYTES,
    add_keystreams_,
    is_usable_public_key,
    pairwise_mask_seed,
    public_bytes,
)
from fedprune.secure.shamir import reconstruct_secret, share_from_bytes

logger = logging.getLogger(__name__)


def validate_masked_input(client: int, message: object, length: int, modulus_bits: int) -> np.ndarray:
    """The vector of a masked input, or ``InvalidMessageError`` naming ``client``.

    Valid: a ``MaskedInput`` from ``client`` whose vector is a 1-D numpy uint64 array of ``length``
    residues modulo 2^k.
    """
    if not isinstance(message, MaskedInput) or message.client != client:
        raise InvalidMessageError(client, "message is not this client's MaskedInput")
    vector = message.vector
    if not isinstance(vector, np.ndarray):
        raise InvalidMessageError(client, f"masked vector is a {type(vector).__name__}, not a numpy array")
    if vector.dtype != np.uint64:
        raise InvalidMessageError(client, f"masked vector has dtype {vector.dtype}, expected uint64")
    if vector.shape != (length,):
        raise InvalidMessageError(client, f"masked vector has shape {vector.shape}, expected ({length},)")
    if modulus_bits < 64 and length and int(vector.max()) > int(modulus_mask(modulus_bits)):
        raise InvalidMessageError(client, f"masked vector has values outside the modulus 2^{modulus_bits}")
    complaints = message.complaints
    if not isinstance(complaints, frozenset) or not all(
        isinstance(v, int | np.integer) and not isinstance(v, bool) for v in complaints
    ):
        raise InvalidMessageError(client, "complaints are not a frozenset of client ids")
    return vector


class SecAggServer:
    """The server's state for one secure-aggregation instance over vectors of ``vector_length`` (``None``:
    fixed by :meth:`collect_masked_inputs`).

    ``neighbours`` is the public communication graph (``graph.ring_graph`` for SecAgg+); ``None`` means
    the complete graph over the clients that advertise keys (Bonawitz et al.; fine for ~16 clients).
    Methods must be called in order, once each; every client rejected along the way is recorded in
    ``rejected`` with the reason. ``roster``: authenticate instance ``(run, instance)`` (see the module
    docstring; adds :meth:`collect_signatures` between the masked inputs and the unmasking).
    """

    def __init__(
        self,
        vector_length: int | None,
        threshold: int,
        neighbours: Mapping[int, Collection[int]] | None = None,
        modulus_bits: int = 64,
        *,
        roster: Roster | None = None,
        run: str = "",
        instance: int = 0,
    ):
        if (vector_length is not None and vector_length < 0) or threshold < 2:
            raise ValueError("vector_length must be >= 0 (or None) and threshold >= 2")
        if roster is not None and neighbours is not None:
            raise ValueError("authenticated secure aggregation uses the complete graph (neighbours=None)")
        self.roster, self.run, self.instance = roster, str(run), int(instance)
        self.signers: frozenset[int] = frozenset()  # U4: survivors that signed the survivor set
        self.vector_length = None if vector_length is None else int(vector_length)
        self.threshold = int(threshold)
        self.modulus_bits = check_modulus_bits(modulus_bits)
        self._graph_spec = None if neighbours is None else check_graph(neighbours)
        self.rejected: dict[int, str] = {}
        self.graph: Graph = {}
        self.adverts: dict[int, KeyAdvert] = {}
        self.sharers: frozenset[int] = frozenset()  # U2
        self.survivors: frozenset[int] = frozenset()  # U3
        self.dropped: frozenset[int] = frozenset()  # U2 \ U3
        self.complaints: dict[int, frozenset[int]] = {}  # valid masked input's sender -> its complaints
        self._inputs: dict[int, np.ndarray] = {}
        self._stage = "keys"

    def _advance(self, expected: str, new: str) -> None:
        if self._stage != expected:
            raise SecAggError(f"server: step out of order (at {self._stage!r}, needs {expected!r})")
        self._stage = new

    def _reject(self, error: InvalidMessageError) -> None:
        logger.warning("secure aggregation excludes %s", error)
        self.rejected[error.client] = error.reason

    def _require(self, clients: Collection[int], step: str) -> None:
        if len(clients) < self.threshold:
            raise TooFewSurvivorsError(
                f"server: only {len(clients)} clients completed {step}, need threshold {self.threshold}"
            )

    def collect_keys(self, adverts: Mapping[int, KeyAdvert]) -> dict[int, dict[int, KeyAdvert]]:
        """Round 1: accept key adverts (keyed by sender); return each client's neighbours' adverts."""
        self._advance("keys", "shares")
        seen: set[bytes] = set()
        for client, advert in sorted(adverts.items()):
            try:
                self._check_advert(client, advert, seen)
            except InvalidMessageError as error:
                self._reject(error)
                continue
            seen.update((advert.enc_public, advert.mask_public))
            self.adverts[client] = advert
        self._reject_shared_identities()
        self._require(self.adverts, "key advertisement")
        spec = complete_graph(self.adverts) if self._graph_spec is None else self._graph_spec
        self.graph = restrict(spec, self.adverts)
        smallest = min(len(vs) + 1 for vs in self.graph.values())
        if 2 * self.threshold <= smallest:
            logger.warning(
                "threshold %d is at most half of the %d share holders of some client; Bonawitz et al. "
                "recommend a threshold above half (protection against a deviating server)",
                self.threshold,
                smallest,
            )
        return {u: {v: self.adverts[v] for v in self.graph[u]} for u in self.graph}

    def _check_advert(self, client: int, advert: object, seen: set[bytes]) -> None:
        if not isinstance(advert, KeyAdvert) or advert.client != client:
            raise InvalidMessageError(client, "message is not this client's KeyAdvert")
        if self._graph_spec is not None and client not in self._graph_spec:
            raise InvalidMessageError(client, "not in the communication graph")
        for key in (advert.enc_public, advert.mask_public):
            if not isinstance(key, bytes) or len(key) != KEY_BYTES:
                raise InvalidMessageError(client, f"public keys must be {KEY_BYTES} bytes")
            if key in seen or advert.enc_public == advert.mask_public:
                raise InvalidMessageError(client, "public key repeats another key")
            if not is_usable_public_key(key):  # else every neighbour's key agreement would fail
                raise InvalidMessageError(client, "public key is a low-order X25519 point")
        if self.roster is None:
            return
        if not isinstance(advert.identity, bytes) or advert.identity not in self.roster:
            raise InvalidMessageError(client, "identity is not in the roster")
        ok = verify_advert(
            advert.identity,
            advert.signature,
            self.run,
            self.instance,
            client,
            advert.enc_public,
            advert.mask_public,
        )
        if not ok:
            raise InvalidMessageError(client, "key advert signature is not valid")

    def _reject_shared_identities(self) -> None:
        """Every advert whose identity another accepted advert also uses is rejected (one is an impostor,
        or one site joined twice)."""
        if self.roster is None:
            return
        uses = Counter(advert.identity for advert in self.adverts.values())
        for client, advert in sorted(self.adverts.items()):
            if uses[advert.identity] > 1:
                self._reject(InvalidMessageError(client, "identity is used by another client too"))
                del self.adverts[client]

    def route_shares(
        self, shares: Mapping[int, Mapping[int, EncryptedShare]]
    ) -> dict[int, dict[int, EncryptedShare]]:
        """Round 2: accept ``{sender: {receiver: share}}``; return ``{receiver: {sender: share}}``.

        A sender is kept only if it addressed exactly one share to each of its neighbours.
        """
        self._advance("shares", "masked")
        accepted = {}
        for sender, bundle in sorted(shares.items()):
            try:
                accepted[sender] = self._check_bundle(sender, bundle)
            except InvalidMessageError as error:
                self._reject(error)
        self.sharers = frozenset(accepted)
        self._require(self.sharers, "key sharing")
        return {v: {u: accepted[u][v] for u in self.graph[v] & self.sharers} for v in self.sharers}

    def _check_bundle(self, sender: int, bundle: object) -> dict[int, EncryptedShare]:
        if sender not in self.graph:
            raise InvalidMessageError(sender, "sent shares without advertising keys")
        if not isinstance(bundle, Mapping) or set(bundle) != set(self.graph[sender]):
            raise InvalidMessageError(sender, "shares are not addressed to exactly its neighbours")
        for receiver, share in bundle.items():
            ok = isinstance(share, EncryptedShare) and isinstance(share.ciphertext, bytes)
            if not ok or (share.sender, share.receiver) != (sender, receiver):
                raise InvalidMessageError(sender, f"malformed share for client {receiver}")
        return dict(bundle)

    def collect_masked_inputs(
        self, inputs: Mapping[int, MaskedInput], vector_length: int | None = None
    ) -> UnmaskRequest:
        """Round 3: validate masked inputs (keyed by sender); return the unmask request for survivors.

        Invalid vectors (wrong length, dtype, or values outside the modulus) or complaints are rejected
        with a reason naming the client, and that client is treated as dropped; so is every client a
        valid complaint names (see the module docstring). ``vector_length`` fixes the
        length here when the server was built without one (keys agreed before the inputs existed).
        """
        self._advance("masked", "unmask" if self.roster is None else "consistency")
        if vector_length is not None:
            if self.vector_length is not None and self.vector_length != vector_length:
                raise SecAggError(f"server: vector length {vector_length} != {self.vector_length}")
            self.vector_length = int(vector_length)
        if self.vector_length is None or self.vector_length < 0:
            raise SecAggError("server: no vector length for the masked inputs")
        for client, message in sorted(inputs.items()):
            try:
                if client not in self.sharers:
                    raise InvalidMessageError(client, "sent a masked input without completing key sharing")
                vector = validate_masked_input(client, message, self.vector_length, self.modulus_bits)
                self._check_complaints(client, message.complaints)
            except InvalidMessageError as error:
                self._reject(error)
                continue
            self._inputs[client] = vector
            self.complaints[client] = message.complaints
        self._drop_accused()
        self.survivors = frozenset(self._inputs)
        self.dropped = self.sharers - self.survivors
        self._require(self.survivors, "masked input")
        return UnmaskRequest(self.survivors, self.dropped)

    def _check_complaints(self, client: int, complaints: frozenset[int]) -> None:
        """A client may only complain about neighbours that shared keys (their shares were routed to it)."""
        if client in complaints:
            raise InvalidMessageError(client, "complains about its own share")
        stray = complaints - (self.graph[client] & self.sharers)
        if stray:
            raise InvalidMessageError(
                client, f"complains about clients {sorted(stray)}, which routed it no share"
            )

    def _accusers(self, client: int) -> frozenset[int]:
        """The clients (with a valid masked input) that could not open ``client``'s share."""
        return frozenset(u for u, accused in self.complaints.items() if client in accused)

    def _drop_accused(self) -> None:
        """Every client named in a valid complaint is dropped, even if it sent a masked input."""
        for v in sorted(set().union(*self.complaints.values())):
            accusers = sorted(self._accusers(v))
            what = f"share to client {accusers[0]}" if len(accusers) == 1 else f"shares to clients {accusers}"
            self._reject(InvalidMessageError(v, f"{what} failed to open"))
            self._inputs.pop(v, None)

    def _masked_with(self, v: int) -> frozenset[int]:
        """The survivors that added a pairwise mask for ``v``: its neighbours that opened its share."""
        return (self.graph[v] & self.survivors) - self._accusers(v)

    def collect_signatures(self, signatures: Mapping[int, SurvivorSignature]) -> dict[int, SurvivorSignature]:
        """Consistency round: accept the survivors' signatures of the survivor set; return the valid
        ones (``{signer: signature}``), which go to every signer with the unmask request."""
        self._advance("consistency", "unmask")
        accepted = {}
        for client, message in sorted(signatures.items()):
            try:
                self._check_signature(client, message)
            except InvalidMessageError as error:
                self._reject(error)
                continue
            accepted[client] = message
        self.signers = frozenset(accepted)
        self._require(self.signers, "the consistency round")
        return accepted

    def _check_signature(self, client: int, message: object) -> None:
        if client not in self.survivors:
            raise InvalidMessageError(client, "signed the survivor set but is not a survivor")
        if not isinstance(message, SurvivorSignature) or message.client != client:
            raise InvalidMessageError(client, "message is not this client's SurvivorSignature")
        identity = self.adverts[client].identity
        if not verify_survivors(identity, message.signature, self.run, self.instance, self.survivors):
            raise InvalidMessageError(client, "signature of the survivor set is not valid")

    def reconstruct_sum(self, replies: Mapping[int, UnmaskReply]) -> np.ndarray:
        """Round 4: from the survivors' unmask replies, the sum Σ_{u in survivors} x_u mod 2^k (uint64).

        Raises ``TooFewSurvivorsError`` (no partial output) when any needed secret has fewer than
        ``threshold`` shares.
        """
        self._advance("unmask", "done")
        seed_points: dict[int, dict[int, int]] = {u: {} for u in self.survivors}
        # a dropped client's key is needed only if some survivor masked with it
        key_points: dict[int, dict[int, int]] = {v: {} for v in self.dropped if self._masked_with(v)}
        answered = 0
        for holder, reply in sorted(replies.items()):
            try:
                seeds, keys = self._check_reply(holder, reply)
            except InvalidMessageError as error:
                self._reject(error)
                continue
            answered += 1
            for u, share in seeds.items():
                seed_points[u][share_point(holder)] = share
            for v, share in keys.items():
                if v in key_points:
                    key_points[v][share_point(holder)] = share
        if answered < self.threshold:
            raise TooFewSurvivorsError(
                f"server: only {answered} clients answered the unmask request, need {self.threshold}"
            )
        seeds = {
            u: self._reconstruct(u, points, "self-mask seed b").to_bytes(KEY_BYTES, "big")
            for u, points in seed_points.items()
        }
        keys = {v: self._reconstruct_key(v, points) for v, points in key_points.items()}
        total = np.zeros(self.vector_length, dtype=np.uint64)  # (length,)
        for u in sorted(self.survivors):
            np.add(total, self._inputs[u], out=total)
        streams = [(seeds[u], -1) for u in sorted(self.survivors)]
        for v, key in sorted(keys.items()):
            # each survivor u that masked with v added mask_sign(u, v) · PRG(s_uv): remove it
            streams += [
                (pairwise_mask_seed(key, self.adverts[u].mask_public), -mask_sign(u, v))
                for u in sorted(self._masked_with(v))
            ]
        add_keystreams_(total, streams)
        self._inputs = {}
        return reduce_(total, self.modulus_bits)

    def _check_reply(self, holder: int, reply: object) -> tuple[dict[int, int], dict[int, int]]:
        if holder not in self.survivors:
            raise InvalidMessageError(holder, "sent an unmask reply but is not a survivor")
        if self.roster is not None and holder not in self.signers:
            raise InvalidMessageError(holder, "sent an unmask reply but did not sign the survivor set")
        if not isinstance(reply, UnmaskReply) or reply.client != holder:
            raise InvalidMessageError(holder, "message is not this client's UnmaskReply")
        may_hold = self.graph[holder] | {holder}
        if not set(reply.seed_shares) <= (self.survivors & may_hold):
            raise InvalidMessageError(holder, "seed shares for clients that are not surviving neighbours")
        held_dropped = (self.dropped & may_hold) - self.complaints[holder]
        if not set(reply.key_shares) <= held_dropped:
            raise InvalidMessageError(
                holder, "key shares for clients that are not dropped neighbours whose shares it held"
            )
        try:
            seeds = {u: share_from_bytes(s) for u, s in reply.seed_shares.items()}
            keys = {v: share_from_bytes(s) for v, s in reply.key_shares.items()}
        except ValueError as error:
            raise InvalidMessageError(holder, f"malformed share: {error}") from error
        return seeds, keys

    def _reconstruct(self, client: int, points: dict[int, int], what: str) -> int:
        if len(points) < self.threshold:
            raise TooFewSurvivorsError(
                f"server: {what} of client {client} has {len(points)} shares, need {self.threshold}"
            )
        try:
            secret = reconstruct_secret(points, self.threshold)
        except ValueError as error:
            raise SecAggError(f"server: shares of the {what} of client {client}: {error}") from error
        if secret >= 1 << (8 * KEY_BYTES):
            raise SecAggError(f"server: reconstructed {what} of client {client} is not a 32-byte value")
        return secret

    def _reconstruct_key(self, client: int, points: dict[int, int]) -> X25519PrivateKey:
        secret = self._reconstruct(client, points, "mask key s^SK")
        key = X25519PrivateKey.from_private_bytes(secret.to_bytes(KEY_BYTES, "big"))
        if public_bytes(key) != self.adverts[client].mask_public:
            raise SecAggError(f"server: reconstructed mask key of client {client} does not match its advert")
        return key
