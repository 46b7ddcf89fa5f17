"""Cryptographic building blocks, all taken from the ``cryptography`` package (nothing home-made).

- key agreement: X25519;
- key derivation: HKDF-SHA256 with a per-purpose ``info`` label (domain separation);
- encryption of Shamir shares sent between clients through the server: AES-256-GCM with a random
  96-bit nonce, under a key that differs per direction (sender, receiver);
- mask expansion (PRG): the AES-256-CTR keystream under a 32-byte seed, counter from zero, read as
  little-endian uint64 words. Every seed is used for exactly one stream (one masked vector).

``random_bytes`` arguments are callables ``n -> n bytes``: ``os.urandom`` in real use, or
``seeded_random_bytes`` for reproducible tests and simulations only.
"""

from __future__ import annotations

import logging
import struct
import sys
from collections.abc import Callable, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

logger = logging.getLogger(__name__)

RandomBytes = Callable[[int], bytes]

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_LABEL = b"fedprune/secagg/v1/"
MASK_INFO = _LABEL + b"pairwise-mask-seed"
SHARE_KEY_INFO = _LABEL + b"share-encryption-key"
SHARE_AAD = _LABEL + b"share"
TEST_RANDOMNESS_INFO = _LABEL + b"deterministic-test-randomness"


def pack_ids(*ids: int) -> bytes:
    """Client ids as 8-byte big-endian unsigned integers."""
    return struct.pack(f">{len(ids)}Q", *ids)


def hkdf_sha256(secret: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    """HKDF-SHA256 (RFC 5869) of ``secret`` with an empty salt and the given ``info`` label."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def new_private_key(random_bytes: RandomBytes) -> X25519PrivateKey:
    """A fresh X25519 private key from 32 random bytes."""
    return X25519PrivateKey.from_private_bytes(random_bytes(KEY_BYTES))


def public_bytes(private_key: X25519PrivateKey) -> bytes:
    """The 32-byte raw public key of a private key."""
    return private_key.public_key().public_bytes_raw()


def agree(private_key: X25519PrivateKey, peer_public: bytes) -> bytes:
    """The X25519 shared secret with a peer's raw public key (raises ValueError on a bad key)."""
    return private_key.exchange(X25519PublicKey.from_public_bytes(peer_public))


def is_usable_public_key(peer_public: bytes) -> bool:
    """False for a raw X25519 public key that no party can agree with: a low-order point (e.g. 32 zero
    bytes) gives the all-zero secret for every private key, which ``agree`` refuses. The private key of
    the check is clamped to a multiple of 8, so one throwaway key decides it for all."""
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        return False
    return True


def pairwise_mask_seed(private_key: X25519PrivateKey, peer_public: bytes) -> bytes:
    """The seed ``s_uv = HKDF(X25519(s_u^SK, s_v^PK))``; both ends derive the same 32 bytes."""
    return hkdf_sha256(agree(private_key, peer_public), MASK_INFO)


def share_key(private_key: X25519PrivateKey, peer_public: bytes, sender: int, receiver: int) -> bytes:
    """The AES-256-GCM key for shares sent from ``sender`` to ``receiver`` (one key per direction)."""
    return hkdf_sha256(agree(private_key, peer_public), SHARE_KEY_INFO + pack_ids(sender, receiver))


def share_aad(sender: int, receiver: int) -> bytes:
    """Associated data binding a share ciphertext to its sender and receiver."""
    return SHARE_AAD + pack_ids(sender, receiver)


def seal(key: bytes, plaintext: bytes, aad: bytes, random_bytes: RandomBytes) -> bytes:
    """``nonce || AES-GCM(key, nonce, plaintext, aad)`` with a fresh random nonce."""
    nonce = random_bytes(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    """Decrypt ``seal``'s output (raises ``cryptography.exceptions.InvalidTag`` if tampered)."""
    return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)


def _keystream(seed: bytes):
    """An AES-256-CTR encryptor under ``seed`` with the counter from zero (its output is the keystream)."""
    if len(seed) != KEY_BYTES:
        raise ValueError(f"PRG seed must be {KEY_BYTES} bytes, got {len(seed)}")
    return Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()


def prg_words(seed: bytes, length: int) -> np.ndarray:
    """``length`` pseudo-random uint64 words: the AES-256-CTR keystream under ``seed`` (counter from 0).

    AES in counter mode uses the CPU's AES instructions: about twice ChaCha20's speed here, and mask
    expansion is most of the cost of secure aggregation for SparseGPT's Hessians.
    """
    encryptor = _keystream(seed)
    # the keystream written straight into the words' buffer (a copy per call cost 4x the cipher itself)
    words = np.empty(length + 2, dtype=np.uint64)  # update_into needs one block (16 bytes) of slack
    encryptor.update_into(bytes(8 * length), memoryview(words).cast("B"))
    words = words[:length]  # (length,), little-endian words as the stream's bytes
    return words.byteswap() if sys.byteorder == "big" else words


_CHUNK_WORDS = 1 << 14  # 128 kB: keystream chunk that stays in cache while it is added


def add_keystreams_(y: np.ndarray, streams: Sequence[tuple[bytes, int]]) -> np.ndarray:
    """``y += Σ sign · prg_words(seed, len(y))`` modulo 2^64 over ``streams = [(seed, ±1), ...]``, in place.

    Equal to adding each full :func:`prg_words` stream, but chunk by chunk: each chunk of keystream is
    written into one small reused buffer and added while it is in cache (3x faster than whole streams
    for SparseGPT-sized vectors, and no stream-sized temporary).
    """
    if y.dtype != np.uint64 or y.ndim != 1:
        raise TypeError(f"y must be a 1-D uint64 array, got {y.dtype} {y.shape}")
    encryptors = []
    for seed, sign in streams:
        if sign not in (1, -1):
            raise ValueError(f"sign must be +1 or -1, got {sign!r}")
        encryptors.append((_keystream(seed), sign))
    if y.shape[0] == 0:
        return y
    chunk = min(_CHUNK_WORDS, y.shape[0])
    zeros = memoryview(np.zeros(chunk, dtype=np.uint64)).cast("B")
    buffer = np.empty(chunk + 2, dtype=np.uint64)  # one block of slack for update_into
    out = memoryview(buffer).cast("B")
    for start in range(0, y.shape[0], chunk):
        part = y[start : start + chunk]  # (≤ chunk,) view
        words = buffer[: part.shape[0]]
        for encryptor, sign in encryptors:
            encryptor.update_into(zeros[: 8 * part.shape[0]], out)
            if sys.byteorder == "big":
                words.byteswap(inplace=True)
            (np.add if sign > 0 else np.subtract)(part, words, out=part)
    return y


def seeded_random_bytes(seed: int, stream: int = 0) -> RandomBytes:
    """Deterministic ``n -> bytes`` from (seed, stream): ChaCha20 under HKDF(seed). TESTS ONLY.

    Anyone who knows ``seed`` can recompute every key and mask, so this must never be used with a
    guessable seed outside tests and reproducible simulations.
    """
    key = hkdf_sha256(str(int(seed)).encode(), TEST_RANDOMNESS_INFO + pack_ids(stream))
    encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()

    def random_bytes(n: int) -> bytes:
        return encryptor.update(bytes(n))

    return random_bytes
