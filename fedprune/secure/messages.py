"""Plain-data messages of the secure-aggregation protocol and its exceptions.

Every field is an int (client id), ``bytes``, a frozenset/dict of those, or a 1-D numpy uint64 array,
so a transport (e.g. Flower records) can carry them without pickling objects.

Message flow (server S, clients u):
  1. u -> S ``KeyAdvert``;             S -> u  ``{v: KeyAdvert}`` of u's neighbours
  2. u -> S ``{v: EncryptedShare}``;   S -> u  ``{v: EncryptedShare}`` addressed to u
  3. u -> S ``MaskedInput``;           S -> u  ``UnmaskRequest`` (the survivor set U3)
  (with a roster) u -> S ``SurvivorSignature``; S -> u ``{v: SurvivorSignature}`` of the signers
  4. u -> S ``UnmaskReply``;           S computes the sum.

With a roster (``identity``), key adverts carry the sender's long-term Ed25519 public key and its
signature; the consistency round between 3 and 4 has every survivor sign the survivor set it was told.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

ID_BYTES = 8


class SecAggError(Exception):
    """The protocol cannot proceed (a party must abort; no partial output)."""


class TooFewSurvivorsError(SecAggError):
    """Fewer than ``threshold`` clients remain, so secrets cannot (and must not) be reconstructed."""


class InvalidMessageError(SecAggError):
    """A message from one client is malformed; that client is excluded."""

    def __init__(self, client: int, reason: str):
        super().__init__(f"client {client}: {reason}")
        self.client = client
        self.reason = reason


@dataclass(frozen=True)
class KeyAdvert:
    """Round 1, client -> server: the two X25519 public keys of ``client``, and (authenticated runs) its
    identity public key with its signature of the advert (``identity.sign_advert``); empty otherwise."""

    client: int
    enc_public: bytes  # c_u^PK, for encrypting shares between clients
    mask_public: bytes  # s_u^PK, for pairwise mask agreement
    identity: bytes = b""  # Ed25519 public key, an entry of the roster
    signature: bytes = b""  # over (run, instance, client, enc_public, mask_public)


@dataclass(frozen=True)
class EncryptedShare:
    """Round 2, ``sender`` -> server -> ``receiver``: AES-GCM-sealed Shamir shares for ``receiver``."""

    sender: int
    receiver: int
    ciphertext: bytes  # nonce || ciphertext || tag of (sender, receiver, share of s^SK, share of b)


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """Round 3, client -> server: ``y_u = x_u + PRG(b_u) + Σ_v ±PRG(s_uv) mod 2^k``.

    ``complaints``: the neighbours whose shares to ``client`` failed to open; it did not mask with them.
    """

    client: int
    vector: np.ndarray  # (length,) uint64
    complaints: frozenset[int] = frozenset()


@dataclass(frozen=True)
class UnmaskRequest:
    """Round 4, server -> clients: who sent a valid masked input and who dropped after sharing keys."""

    survivors: frozenset[int]
    dropped: frozenset[int]


@dataclass(frozen=True)
class SurvivorSignature:
    """Consistency round, client -> server -> survivors: ``client``'s signature of the survivor set it
    was told (``identity.sign_survivors``)."""

    client: int
    signature: bytes


@dataclass(frozen=True)
class UnmaskReply:
    """Round 4, client -> server: shares of ``b_v`` for survivors v and of ``s_v^SK`` for dropped v."""

    client: int
    seed_shares: dict[int, bytes] = field(default_factory=dict)  # v in survivors -> share of b_v
    key_shares: dict[int, bytes] = field(default_factory=dict)  # v in dropped -> share of s_v^SK


def message_nbytes(message: object) -> int:
    """Payload size in bytes (ids count 8 bytes each; no transport framing)."""
    if isinstance(message, KeyAdvert):
        keys = (message.enc_public, message.mask_public, message.identity, message.signature)
        return ID_BYTES + sum(len(key) for key in keys)
    if isinstance(message, SurvivorSignature):
        return ID_BYTES + len(message.signature)
    if isinstance(message, EncryptedShare):
        return 2 * ID_BYTES + len(message.ciphertext)
    if isinstance(message, MaskedInput):
        vector = message.vector
        return ID_BYTES * (1 + len(message.complaints)) + (
            vector.nbytes if isinstance(vector, np.ndarray) else 0
        )
    if isinstance(message, UnmaskRequest):
        return ID_BYTES * (len(message.survivors) + len(message.dropped))
    if isinstance(message, UnmaskReply):
        shares = [*message.seed_shares.values(), *message.key_shares.values()]
        return ID_BYTES + sum(ID_BYTES + len(share) for share in shares)
    if isinstance(message, dict):
        return sum(message_nbytes(v) for v in message.values())
    raise TypeError(f"unknown message type {type(message).__name__}")
