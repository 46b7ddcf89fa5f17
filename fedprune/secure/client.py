"""The client party of secure aggregation (Bonawitz et al. 2017; SecAgg+, Bell et al. 2020).

A ``SecAggClient`` runs one protocol instance for one vector, one step per server round, in order:
``advertise_keys`` -> ``share_keys`` -> ``masked_input`` -> (with a roster: ``check_consistency``) ->
``unmask``. Each step may run once: a mask seed reused for a second vector would leak the difference of
the two vectors, and answering a second unmask request could reveal both secrets of one client.

Pairwise-mask sign convention: client u adds ``+PRG(s_uv)`` if ``u < v`` and ``-PRG(s_uv)`` if ``u > v``,
so the pairwise masks of two surviving neighbours cancel in the sum.

Threat model: without a roster, an honest-but-curious server and clients; a client only refuses
requests that are inconsistent on their face (see ``unmask``). With a roster (the pinned identity public
keys of all sites, ``identity``) the client also resists an active server or network attacker
(Bonawitz et al. 2017, malicious variant): it signs its adverts, accepts only neighbours' adverts signed
by distinct roster identities, signs the survivor set it is told, and unmasks only when at least
``threshold`` survivors signed exactly that set. Any failed check raises ``SecAggError``: only the
router can have produced it (an honest server verified the same signatures), so continuing would mean
sharing secrets with keys the attacker chose; the client aborts this instance, which the protocol
already treats as a dropout (a dropout reveals nothing, as its secrets are released only on request of
``threshold`` agreeing survivors).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedprune.secure.encoding import check_modulus_bits, check_residues, reduce_
from fedprune.secure.identity import (
    Roster,
    identity_public,
    sign_advert,
    sign_survivors,
    verify_advert,
    verify_survivors,
)
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
    RandomBytes,
    add_keystreams_,
    new_private_key,
    open_sealed,
    pack_ids,
    pairwise_mask_seed,
    public_bytes,
    seal,
    share_aad,
    share_key,
)
from fedprune.secure.shamir import SHARE_BYTES, share_from_bytes, share_to_bytes, split_secret

logger = logging.getLogger(__name__)

MAX_CLIENT_ID = (1 << 64) - 1
_PLAINTEXT_BYTES = 16 + 2 * SHARE_BYTES


def share_point(client: int) -> int:
    """The Shamir evaluation point of a client: ``client + 1`` (ids are in ``[0, 2^64 - 1)``)."""
    return client + 1


def check_client_id(client: int) -> int:
    """Validate a client id (an int in ``[0, 2^64 - 1)``)."""
    if not isinstance(client, int | np.integer) or not 0 <= int(client) < MAX_CLIENT_ID:
        raise ValueError(f"client ids must be ints in [0, 2^64 - 1), got {client!r}")
    return int(client)


def mask_sign(u: int, v: int) -> int:
    """+1 if client u adds ``PRG(s_uv)`` to its input, -1 if it subtracts it."""
    return 1 if u < v else -1


def _pack_shares(sender: int, receiver: int, key_share: int, seed_share: int) -> bytes:
    """Plaintext of an ``EncryptedShare``."""
    return pack_ids(sender, receiver) + share_to_bytes(key_share) + share_to_bytes(seed_share)


class SecAggClient:
    """One client's state across the rounds of one secure-aggregation instance.

    ``identity`` and ``roster`` (both or neither) authenticate the instance ``(run, instance)``: see the
    module docstring. The identity must be in the roster.
    """

    def __init__(
        self,
        client_id: int,
        modulus_bits: int = 64,
        random_bytes: RandomBytes = os.urandom,
        *,
        identity: Ed25519PrivateKey | None = None,
        roster: Roster | None = None,
        run: str = "",
        instance: int = 0,
    ):
        self.client_id = check_client_id(client_id)
        self.modulus_bits = check_modulus_bits(modulus_bits)
        self._random_bytes = random_bytes
        if (identity is None) != (roster is None):
            raise ValueError("an authenticated client needs both its identity and the roster")
        if identity is not None and identity_public(identity) not in roster:
            raise ValueError(f"client {self.client_id}: its identity is not in the roster")
        self._identity, self._roster = identity, roster
        self.run, self.instance = str(run), int(instance)
        self._request: UnmaskRequest | None = None  # the survivor set this client signed
        self._stage = "new"
        self._threshold = 0
        self._peers: dict[int, KeyAdvert] = {}
        self._held: dict[int, tuple[int, int]] = {}  # v -> (share of s_v^SK, share of b_v) held by me
        self._complaints: frozenset[int] = frozenset()  # neighbours whose shares to me failed to open
        self._enc_key = None
        self._mask_key = None
        self._seed = b""

    def to_state(self) -> dict:
        """This client's state between rounds as JSON-safe plain data (hex strings, ints).

        Holds private keys and secrets: it must stay on the client's own disk (never sent anywhere).
        """

        def raw(key) -> str:
            return "" if key is None else key.private_bytes_raw().hex()

        request = self._request
        return {
            "client_id": self.client_id,
            "modulus_bits": self.modulus_bits,
            "authenticated": self.authenticated,
            "run": self.run,
            "instance": self.instance,
            "request": None if request is None else [sorted(request.survivors), sorted(request.dropped)],
            "stage": self._stage,
            "threshold": self._threshold,
            "peers": {
                str(v): [a.enc_public.hex(), a.mask_public.hex(), a.identity.hex(), a.signature.hex()]
                for v, a in self._peers.items()
            },
            "held": {str(v): [k, s] for v, (k, s) in self._held.items()},
            "complaints": sorted(self._complaints),
            "enc_key": raw(self._enc_key),
            "mask_key": raw(self._mask_key),
            "seed": self._seed.hex(),
        }

    @property
    def authenticated(self) -> bool:
        """Whether this instance runs with signed adverts and the consistency round."""
        return self._roster is not None

    @classmethod
    def from_state(
        cls,
        state: dict,
        random_bytes: RandomBytes = os.urandom,
        *,
        identity: Ed25519PrivateKey | None = None,
        roster: Roster | None = None,
    ) -> SecAggClient:
        """Inverse of :meth:`to_state`; an authenticated state needs the identity and roster again."""
        if bool(state.get("authenticated", False)) != (roster is not None):
            raise SecAggError("the saved client and the given roster disagree on authentication")
        client = cls(
            int(state["client_id"]),
            int(state["modulus_bits"]),
            random_bytes,
            identity=identity,
            roster=roster,
            run=str(state.get("run", "")),
            instance=int(state.get("instance", 0)),
        )
        request = state.get("request")
        if request is not None:
            client._request = UnmaskRequest(frozenset(request[0]), frozenset(request[1]))

        def key(text: str):
            return X25519PrivateKey.from_private_bytes(bytes.fromhex(text)) if text else None

        client._stage = str(state["stage"])
        client._threshold = int(state["threshold"])
        client._peers = {
            int(v): KeyAdvert(int(v), *(bytes.fromhex(x) for x in keys)) for v, keys in state["peers"].items()
        }
        client._held = {int(v): (int(k), int(s)) for v, (k, s) in state["held"].items()}
        client._complaints = frozenset(int(v) for v in state["complaints"])
        client._enc_key = key(state["enc_key"])
        client._mask_key = key(state["mask_key"])
        client._seed = bytes.fromhex(state["seed"])
        return client

    @property
    def neighbours(self) -> frozenset[int]:
        """The neighbours whose keys this client shared with (public ids)."""
        return frozenset(self._peers)

    def _advance(self, expected: str, new: str) -> None:
        if self._stage != expected:
            raise SecAggError(
                f"client {self.client_id}: step out of order (at {self._stage!r}, needs {expected!r})"
            )
        self._stage = new

    def advertise_keys(self) -> KeyAdvert:
        """Round 1: fresh key pairs (c_u for share encryption, s_u for masks); send the public keys."""
        self._advance("new", "advertised")
        self._enc_key = new_private_key(self._random_bytes)
        self._mask_key = new_private_key(self._random_bytes)
        return self._own_advert()

    def _own_advert(self) -> KeyAdvert:
        enc, mask = public_bytes(self._enc_key), public_bytes(self._mask_key)
        if self._identity is None:
            return KeyAdvert(self.client_id, enc, mask)
        signature = sign_advert(self._identity, self.run, self.instance, self.client_id, enc, mask)
        return KeyAdvert(self.client_id, enc, mask, identity_public(self._identity), signature)

    def share_keys(self, peer_keys: Mapping[int, KeyAdvert], threshold: int) -> dict[int, EncryptedShare]:
        """Round 2: Shamir-share ``b_u`` and ``s_u^SK`` among the neighbours and self; seal each share.

        ``peer_keys`` are the neighbours' adverts as routed by the server (not including this client).
        Returns ``{receiver: EncryptedShare}``; this client keeps its own share. With a roster, every
        advert must carry a valid signature by a roster identity, all identities distinct and none this
        client's: else ``SecAggError`` (the router substituted keys; see the module docstring).
        """
        self._advance("advertised", "shared")
        own = self._own_advert()
        peers = self._check_peer_keys(peer_keys, own)
        holders = sorted([self.client_id, *peers])
        if not 2 <= threshold <= len(holders):
            raise SecAggError(
                f"client {self.client_id}: threshold {threshold} not in [2, {len(holders)}] "
                f"(this client and its {len(peers)} neighbours)"
            )
        self._threshold = threshold
        self._peers = peers
        self._seed = self._random_bytes(KEY_BYTES)  # b_u
        points = [share_point(v) for v in holders]
        key_secret = int.from_bytes(self._mask_key.private_bytes_raw(), "big")
        key_shares = split_secret(key_secret, points, threshold, self._random_bytes)
        seed_shares = split_secret(int.from_bytes(self._seed, "big"), points, threshold, self._random_bytes)
        u = self.client_id
        self._held = {u: (key_shares[share_point(u)], seed_shares[share_point(u)])}
        out = {}
        for v, advert in peers.items():
            plaintext = _pack_shares(u, v, key_shares[share_point(v)], seed_shares[share_point(v)])
            key = share_key(self._enc_key, advert.enc_public, u, v)
            out[v] = EncryptedShare(u, v, seal(key, plaintext, share_aad(u, v), self._random_bytes))
        return out

    def _check_peer_keys(self, peer_keys: Mapping[int, KeyAdvert], own: KeyAdvert) -> dict[int, KeyAdvert]:
        """Validate routed adverts: ids match, 32-byte keys, all public keys distinct."""
        peers = {}
        seen = {own.enc_public, own.mask_public}
        for v, advert in peer_keys.items():
            v = check_client_id(v)
            if v == self.client_id:
                raise SecAggError(
                    f"client {self.client_id}: server routed this client's own keys as a peer's"
                )
            if not isinstance(advert, KeyAdvert) or advert.client != v:
                raise SecAggError(f"client {self.client_id}: advert routed for {v} is not client {v}'s")
            for key in (advert.enc_public, advert.mask_public):
                if not isinstance(key, bytes) or len(key) != KEY_BYTES or key in seen:
                    raise SecAggError(
                        f"client {self.client_id}: client {v} has an invalid or repeated public key"
                    )
                seen.add(key)
            if self._roster is not None:
                self._check_signed(v, advert, own.identity, {a.identity for a in peers.values()})
            peers[v] = advert
        return peers

    def _check_signed(self, v: int, advert: KeyAdvert, own: bytes, taken: set[bytes]) -> None:
        """An advert routed for neighbour ``v`` is signed by a roster identity not used by anyone else."""
        u = self.client_id
        if not isinstance(advert.identity, bytes) or advert.identity not in self._roster:
            raise SecAggError(f"client {u}: advert routed for client {v} names an identity not in the roster")
        if advert.identity == own or advert.identity in taken:
            raise SecAggError(f"client {u}: advert routed for client {v} reuses another client's identity")
        ok = verify_advert(
            advert.identity,
            advert.signature,
            self.run,
            self.instance,
            v,
            advert.enc_public,
            advert.mask_public,
        )
        if not ok:
            raise SecAggError(f"client {u}: advert routed for client {v} has an invalid signature")

    def masked_input(self, vector: np.ndarray, received_shares: Mapping[int, EncryptedShare]) -> MaskedInput:
        """Round 3: open the shares addressed to me, then send ``x_u + PRG(b_u) + Σ_v ±PRG(s_uv)``.

        ``vector`` holds this client's encoded input (1-D uint64 residues modulo 2^k; see ``encoding``).
        ``received_shares`` is ``{sender: EncryptedShare}`` from the neighbours that completed round 2.
        This client masks with exactly the senders whose shares open; one that fails to decrypt or parse
        is logged, left out, and reported in ``complaints`` (the server then drops that sender). A share
        from a non-neighbour aborts this client (an honest server never routes one).
        """
        self._advance("shared", "masked")
        x = check_residues(vector, self.modulus_bits, name=f"client {self.client_id} input")
        if x.ndim != 1:
            raise ValueError(f"client {self.client_id}: input must be 1-D, got shape {x.shape}")
        self._complaints = self._open_shares(received_shares)
        if len(self._held) < self._threshold:
            raise TooFewSurvivorsError(
                f"client {self.client_id}: only {len(self._held)} of this client and its neighbours "
                f"completed key sharing with it, need {self._threshold}"
            )
        y = x.copy()  # (length,) uint64; the caller's vector is not modified
        streams = [(self._seed, +1)] + [
            (pairwise_mask_seed(self._mask_key, self._peers[v].mask_public), mask_sign(self.client_id, v))
            for v in sorted(self._held)
            if v != self.client_id
        ]
        add_keystreams_(y, streams)
        # The secrets are no longer needed here; their shares live with the neighbours.
        self._seed, self._mask_key = b"", None
        return MaskedInput(self.client_id, reduce_(y, self.modulus_bits), self._complaints)

    def _open_shares(self, received_shares: Mapping[int, EncryptedShare]) -> frozenset[int]:
        """Keep the shares that open in ``_held``; return the senders of those that do not."""
        u = self.client_id
        failed = set()
        for sender, message in sorted(received_shares.items()):
            if sender not in self._peers:
                raise SecAggError(f"client {u}: server routed shares from client {sender}, not a neighbour")
            try:
                self._held[sender] = self._open_share(sender, message)
            except InvalidMessageError as error:
                logger.warning("client %d leaves out neighbour %d: %s", u, sender, error.reason)
                failed.add(sender)
        return frozenset(failed)

    def _open_share(self, sender: int, message: EncryptedShare) -> tuple[int, int]:
        """Decrypt and parse the shares ``sender`` addressed to this client."""
        u = self.client_id
        if not isinstance(message, EncryptedShare) or (message.sender, message.receiver) != (sender, u):
            raise InvalidMessageError(sender, f"share routed to client {u} is not addressed {sender}->{u}")
        key = share_key(self._enc_key, self._peers[sender].enc_public, sender, u)
        try:
            plaintext = open_sealed(key, message.ciphertext, share_aad(sender, u))
        except (InvalidTag, ValueError) as error:  # ValueError: too short to hold a nonce
            raise InvalidMessageError(sender, f"share for client {u} failed authentication") from error
        if len(plaintext) != _PLAINTEXT_BYTES or plaintext[:16] != pack_ids(sender, u):
            raise InvalidMessageError(sender, f"share for client {u} is malformed")
        try:
            key_share = share_from_bytes(plaintext[16 : 16 + SHARE_BYTES])
            seed_share = share_from_bytes(plaintext[16 + SHARE_BYTES :])
        except ValueError as error:
            raise InvalidMessageError(sender, f"share for client {u} is malformed: {error}") from error
        return key_share, seed_share

    def check_consistency(self, request: UnmaskRequest) -> SurvivorSignature:
        """Consistency round (authenticated instances): check the survivor set and sign it.

        Refuses what :meth:`unmask` refuses, and lists naming a client that is not one of this client's
        verified neighbours. The request is kept: :meth:`unmask` answers exactly this one.
        """
        if self._roster is None:
            raise SecAggError(f"client {self.client_id}: the consistency round needs a roster")
        self._advance("masked", "checked")
        survivors, dropped = self._check_request(request)
        stray = (survivors | dropped) - set(self._peers) - {self.client_id}
        if stray:
            raise SecAggError(f"client {self.client_id}: clients {sorted(stray)} are not its neighbours")
        self._request = UnmaskRequest(survivors, dropped)
        signature = sign_survivors(self._identity, self.run, self.instance, survivors)
        return SurvivorSignature(self.client_id, signature)

    def _check_signatures(self, request: UnmaskRequest, signatures: Mapping[int, SurvivorSignature]) -> None:
        """At least ``threshold`` survivors signed exactly the survivor set this client signed."""
        u = self.client_id
        if request is None or signatures is None:
            raise SecAggError(f"client {u}: an authenticated unmask needs the request and the signatures")
        signed = self._request
        if (frozenset(request.survivors), frozenset(request.dropped)) != (signed.survivors, signed.dropped):
            raise SecAggError(f"client {u}: the unmask request differs from the survivor set it signed")
        identities = {v: a.identity for v, a in self._peers.items()} | {u: identity_public(self._identity)}
        for v, message in signatures.items():
            ok = isinstance(message, SurvivorSignature) and message.client == v and v in signed.survivors
            if not ok or not verify_survivors(
                identities[v], message.signature, self.run, self.instance, signed.survivors
            ):
                raise SecAggError(f"client {u}: client {v}'s signature of the survivor set is not valid")
        if len(signatures) < self._threshold:
            raise TooFewSurvivorsError(
                f"client {u}: only {len(signatures)} survivors signed the survivor set, need {self._threshold}"
            )

    def unmask(
        self, request: UnmaskRequest, signatures: Mapping[int, SurvivorSignature] | None = None
    ) -> UnmaskReply:
        """Round 4: reveal shares of ``b_v`` for surviving v and of ``s_v^SK`` for dropped v.

        Refuses (``SecAggError``) a request that lists a client as both survivor and dropped, lists
        this client as dropped, lists as a survivor a neighbour whose share to this client failed to open,
        or names fewer than ``threshold`` survivors among this client and its neighbours (ids it does
        not know never count). Never reveals both shares of one client; reveals
        shares only of the clients whose shares it holds. Authenticated: ``request`` must be the one it
        signed in :meth:`check_consistency` and ``signatures`` (``{signer: SurvivorSignature}``) must hold
        at least ``threshold`` valid signatures of it by survivors, and nothing else.
        """
        if self._roster is not None:
            self._advance("checked", "unmasked")
            self._check_signatures(request, signatures)
            survivors, dropped = self._request.survivors, self._request.dropped
        else:
            self._advance("masked", "unmasked")
            survivors, dropped = self._check_request(request)
        seed_shares = {v: share_to_bytes(s[1]) for v, s in self._held.items() if v in survivors}
        key_shares = {v: share_to_bytes(s[0]) for v, s in self._held.items() if v in dropped}
        self._held = {}
        return UnmaskReply(self.client_id, seed_shares, key_shares)

    def _check_request(self, request: UnmaskRequest) -> tuple[frozenset[int], frozenset[int]]:
        """The survivors and dropped of a request that is consistent on its face (else ``SecAggError``)."""
        if not isinstance(request, UnmaskRequest):
            raise SecAggError(f"client {self.client_id}: the unmask request is malformed")
        survivors, dropped = frozenset(request.survivors), frozenset(request.dropped)
        u = self.client_id
        if survivors & dropped:
            raise SecAggError(
                f"client {u}: clients {sorted(survivors & dropped)} are both survivors and dropped"
            )
        if u not in survivors:
            raise SecAggError(f"client {u}: sent its masked input but is not listed as a survivor")
        if survivors & self._complaints:
            raise SecAggError(
                f"client {u}: clients {sorted(survivors & self._complaints)} are listed as survivors, "
                "but their shares to this client failed to open"
            )
        known = survivors & (set(self._peers) | {u})  # ids beyond the neighbourhood cannot make up t
        if len(known) < self._threshold:
            raise TooFewSurvivorsError(
                f"client {u}: only {len(known)} survivors among this client and its neighbours, need "
                f"{self._threshold}; refusing to unmask"
            )
        return survivors, dropped
