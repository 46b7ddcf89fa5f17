import numpy as np
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedprune.secure import primitives
from fedprune.secure.primitives import (
    add_keystreams_,
    new_private_key,
    open_sealed,
    pairwise_mask_seed,
    prg_words,
    public_bytes,
    seal,
    seeded_random_bytes,
    share_key,
)


def test_prg_is_deterministic_and_seed_dependent():
    a = prg_words(b"\x01" * 32, 1000)
    assert a.dtype == np.uint64 and a.shape == (1000,)
    assert np.array_equal(a, prg_words(b"\x01" * 32, 1000))
    assert np.array_equal(a[:10], prg_words(b"\x01" * 32, 10))  # a prefix of the same stream
    assert np.count_nonzero(a == prg_words(b"\x02" * 32, 1000)) == 0
    with pytest.raises(ValueError):
        prg_words(b"short", 4)


def test_prg_is_the_aes256_ctr_keystream():
    # known answer: AES-256 of the zero block under the all-zero key
    assert prg_words(bytes(32), 2).tobytes().hex() == "dc95c078a2408989ad48a21492842087"
    # block i of the stream is AES_k(i) (128-bit big-endian counter), read as little-endian uint64 words
    key = bytes(range(32))
    counters = b"".join(i.to_bytes(16, "big") for i in range(5))
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(counters)
    assert prg_words(key, 10).tobytes() == ecb
    assert np.array_equal(prg_words(key, 9), np.frombuffer(ecb[:72], dtype="<u8"))


@pytest.mark.parametrize("chunk", [3, 4, 1 << 14])  # several chunks with a short last one; one chunk
def test_added_keystreams_equal_the_sum_of_whole_streams(monkeypatch, chunk):
    monkeypatch.setattr(primitives, "_CHUNK_WORDS", chunk)
    seeds = [bytes([i]) * 32 for i in (1, 2, 3)]
    y = np.arange(11, dtype=np.uint64)
    original = y.copy()
    out = add_keystreams_(y, [(seeds[0], +1), (seeds[1], -1), (seeds[2], +1)])
    expected = original + prg_words(seeds[0], 11) - prg_words(seeds[1], 11) + prg_words(seeds[2], 11)
    assert out is y and np.array_equal(y, expected)  # in place, modulo 2^64
    add_keystreams_(y, [(seeds[2], -1), (seeds[0], -1), (seeds[1], +1)])
    assert np.array_equal(y, original)  # the same streams with opposite signs cancel
    assert add_keystreams_(np.zeros(0, dtype=np.uint64), [(seeds[0], 1)]).shape == (0,)


def test_added_keystreams_reject_bad_arguments():
    y = np.zeros(4, dtype=np.uint64)
    with pytest.raises(ValueError, match="32 bytes"):
        add_keystreams_(y, [(b"short", 1)])
    with pytest.raises(ValueError, match="sign"):
        add_keystreams_(y, [(bytes(32), 2)])
    with pytest.raises(TypeError):
        add_keystreams_(y.astype(np.int64), [(bytes(32), 1)])
    assert not y.any()


def test_key_agreement_is_symmetric_and_directional_keys_differ():
    rand = seeded_random_bytes(5)
    a, b = new_private_key(rand), new_private_key(rand)
    assert pairwise_mask_seed(a, public_bytes(b)) == pairwise_mask_seed(b, public_bytes(a))
    ab = share_key(a, public_bytes(b), 1, 2)
    assert ab == share_key(b, public_bytes(a), 1, 2)
    assert ab != share_key(a, public_bytes(b), 2, 1)


def test_seal_open_and_tamper_detection():
    rand = seeded_random_bytes(6)
    key = rand(32)
    sealed = seal(key, b"share", b"aad", rand)
    assert open_sealed(key, sealed, b"aad") == b"share"
    with pytest.raises(InvalidTag):
        open_sealed(key, sealed, b"other aad")
    with pytest.raises(InvalidTag):
        open_sealed(key, sealed[:-1] + bytes([sealed[-1] ^ 1]), b"aad")


def test_seeded_randomness_is_reproducible_per_stream():
    assert seeded_random_bytes(1, 0)(16) == seeded_random_bytes(1, 0)(16)
    assert seeded_random_bytes(1, 0)(16) != seeded_random_bytes(1, 1)(16)
    rand = seeded_random_bytes(1, 0)
    assert rand(8) != rand(8)  # a stream, not a constant
