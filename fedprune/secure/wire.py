"""Secure-aggregation messages as flat ``{key: numpy array}`` dicts (any transport's array records).

Keys carry client ids in decimal (``enc.<v>``, ``share.<v>``, ...), and the protocol instance as a
prefix (``<instance>/``) where one message carries several instances; byte strings travel as uint8
arrays, id sets and masked vectors as uint64 arrays. Parsers raise ``ValueError`` on anything
malformed, so a transport's validation can reject the sender.
"""

from __future__ import annotations

import logging

import numpy as np

from fedprune.secure.messages import (
    EncryptedShare,
    KeyAdvert,
    MaskedInput,
    SurvivorSignature,
    UnmaskReply,
    UnmaskRequest,
)

logger = logging.getLogger(__name__)


def _bytes(arrays: dict[str, np.ndarray], key: str) -> bytes:
    value = arrays[key]
    if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim != 1:
        raise ValueError(f"{key}: expected a 1-D uint8 array")
    return value.tobytes()


def _u8(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).copy()


def _id_set(arrays: dict[str, np.ndarray], key: str) -> frozenset[int]:
    value = arrays[key]
    if not isinstance(value, np.ndarray) or value.dtype != np.uint64 or value.ndim != 1:
        raise ValueError(f"{key}: expected a 1-D uint64 array")
    return frozenset(int(v) for v in value)


def _id_array(ids: frozenset[int]) -> np.ndarray:
    return np.array(sorted(ids), dtype=np.uint64)


def _ids(arrays: dict[str, np.ndarray], prefix: str) -> dict[int, str]:
    """``{client id: key}`` of the keys ``<prefix>.<id>``."""
    out = {}
    for key in arrays:
        if key.startswith(prefix + "."):
            tail = key[len(prefix) + 1 :]
            if not tail.isdigit():
                raise ValueError(f"bad client id in key {key!r}")
            out[int(tail)] = key
    return out


def prefixed(arrays: dict[str, np.ndarray], instance: int) -> dict[str, np.ndarray]:
    """The arrays of protocol instance ``instance`` under keys ``<instance>/<key>`` (several instances
    travel in one message)."""
    return {f"{instance}/{key}": value for key, value in arrays.items()}


def instance_arrays(arrays: dict[str, np.ndarray], instance: int) -> dict[str, np.ndarray]:
    """Inverse of :func:`prefixed`: the arrays of ``instance``, with their own keys."""
    head = f"{instance}/"
    return {key[len(head) :]: value for key, value in arrays.items() if key.startswith(head)}


_ADVERT_FIELDS = ("enc", "mask", "identity", "signature")  # KeyAdvert's byte fields, in order


def _optional_bytes(arrays: dict[str, np.ndarray], key: str) -> bytes:
    """``_bytes``, or empty when absent (an unauthenticated advert has no identity nor signature)."""
    return _bytes(arrays, key) if key in arrays else b""


def _advert_fields(advert: KeyAdvert) -> tuple[bytes, ...]:
    return advert.enc_public, advert.mask_public, advert.identity, advert.signature


def advert_to_arrays(advert: KeyAdvert) -> dict[str, np.ndarray]:
    """A client's own key advert (with its identity and signature when it has them)."""
    fields = zip(_ADVERT_FIELDS, _advert_fields(advert), strict=True)
    return {key: _u8(data) for key, data in fields if data or key in ("enc", "mask")}


def advert_from_arrays(client: int, arrays: dict[str, np.ndarray]) -> KeyAdvert:
    """Inverse of :func:`advert_to_arrays`."""
    return KeyAdvert(
        client,
        _bytes(arrays, "enc"),
        _bytes(arrays, "mask"),
        _optional_bytes(arrays, "identity"),
        _optional_bytes(arrays, "signature"),
    )


def peers_to_arrays(adverts: dict[int, KeyAdvert]) -> dict[str, np.ndarray]:
    """The neighbours' adverts routed to one client."""
    out = {}
    for v, advert in adverts.items():
        for key, data in zip(_ADVERT_FIELDS, _advert_fields(advert), strict=True):
            if data or key in ("enc", "mask"):
                out[f"{key}.{v}"] = _u8(data)
    return out


def peers_from_arrays(arrays: dict[str, np.ndarray]) -> dict[int, KeyAdvert]:
    """Inverse of :func:`peers_to_arrays`."""
    enc, mask = _ids(arrays, "enc"), _ids(arrays, "mask")
    identity, signature = _ids(arrays, "identity"), _ids(arrays, "signature")
    if set(enc) != set(mask) or not set(identity) | set(signature) <= set(enc):
        raise ValueError("every neighbour needs both public keys")

    def optional(keys: dict[int, str], v: int) -> bytes:
        return _bytes(arrays, keys[v]) if v in keys else b""

    return {
        v: KeyAdvert(
            v, _bytes(arrays, enc[v]), _bytes(arrays, mask[v]), optional(identity, v), optional(signature, v)
        )
        for v in enc
    }


def shares_to_arrays(shares: dict[int, EncryptedShare], outgoing: bool) -> dict[str, np.ndarray]:
    """Sealed shares keyed by the other party (receiver if ``outgoing``, else sender)."""
    return {f"share.{s.receiver if outgoing else s.sender}": _u8(s.ciphertext) for s in shares.values()}


def shares_from_arrays(me: int, arrays: dict[str, np.ndarray], outgoing: bool) -> dict[int, EncryptedShare]:
    """Inverse of :func:`shares_to_arrays` (``me``: the sender if ``outgoing``, else the receiver)."""
    out = {}
    for other, key in _ids(arrays, "share").items():
        sender, receiver = (me, other) if outgoing else (other, me)
        out[other] = EncryptedShare(sender, receiver, _bytes(arrays, key))
    return out


def masked_to_arrays(masked: MaskedInput) -> dict[str, np.ndarray]:
    """A client's masked vector and the neighbours whose shares to it failed to open."""
    return {"masked": masked.vector, "complaints": _id_array(masked.complaints)}


def masked_from_arrays(client: int, arrays: dict[str, np.ndarray]) -> MaskedInput:
    """Inverse of :func:`masked_to_arrays` (the vector itself is validated by the server)."""
    return MaskedInput(client, arrays["masked"], _id_set(arrays, "complaints"))


def request_to_arrays(request: UnmaskRequest) -> dict[str, np.ndarray]:
    """The unmask request."""
    return {"survivors": _id_array(request.survivors), "dropped": _id_array(request.dropped)}


def request_from_arrays(arrays: dict[str, np.ndarray]) -> UnmaskRequest:
    """Inverse of :func:`request_to_arrays`."""
    return UnmaskRequest(_id_set(arrays, "survivors"), _id_set(arrays, "dropped"))


def reply_to_arrays(reply: UnmaskReply) -> dict[str, np.ndarray]:
    """A client's unmask reply."""
    out = {f"seed.{v}": _u8(s) for v, s in reply.seed_shares.items()}
    out.update({f"key.{v}": _u8(s) for v, s in reply.key_shares.items()})
    return out


def reply_from_arrays(client: int, arrays: dict[str, np.ndarray]) -> UnmaskReply:
    """Inverse of :func:`reply_to_arrays`."""
    seeds = {v: _bytes(arrays, k) for v, k in _ids(arrays, "seed").items()}
    keys = {v: _bytes(arrays, k) for v, k in _ids(arrays, "key").items()}
    return UnmaskReply(client, seeds, keys)


def signature_to_arrays(signature: SurvivorSignature) -> dict[str, np.ndarray]:
    """A survivor's signature of the survivor set."""
    return {"signature": _u8(signature.signature)}


def signature_from_arrays(client: int, arrays: dict[str, np.ndarray]) -> SurvivorSignature:
    """Inverse of :func:`signature_to_arrays`."""
    return SurvivorSignature(client, _bytes(arrays, "signature"))


def signatures_to_arrays(signatures: dict[int, SurvivorSignature]) -> dict[str, np.ndarray]:
    """The signers' signatures forwarded to each signer (keyed by signer)."""
    return {f"signature.{v}": _u8(s.signature) for v, s in signatures.items()}


def signatures_from_arrays(arrays: dict[str, np.ndarray]) -> dict[int, SurvivorSignature]:
    """Inverse of :func:`signatures_to_arrays`."""
    return {v: SurvivorSignature(v, _bytes(arrays, k)) for v, k in _ids(arrays, "signature").items()}
