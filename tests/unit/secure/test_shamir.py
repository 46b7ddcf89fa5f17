import itertools

import pytest

from fedprune.secure.primitives import seeded_random_bytes
from fedprune.secure.shamir import (
    PRIME,
    interpolate,
    reconstruct_secret,
    share_from_bytes,
    share_to_bytes,
    split_secret,
)


def test_interpolation_hand_checked():
    # f(x) = 3 + 2x: f(1) = 5, f(2) = 7
    assert interpolate([(1, 5), (2, 7)], 0) == 3
    assert interpolate([(1, 5), (2, 7)], 4) == 11


def test_any_threshold_subset_recovers_the_secret():
    secret = 2**256 - 12345
    shares = split_secret(secret, [1, 2, 3, 4, 5], threshold=3, random_bytes=seeded_random_bytes(0))
    for subset in itertools.combinations(shares, 3):
        assert reconstruct_secret({x: shares[x] for x in subset}, 3) == secret
    assert reconstruct_secret(shares, 3) == secret  # extra shares are checked, and agree


def test_too_few_or_corrupted_shares_raise():
    shares = split_secret(42, [10, 20, 30, 40], threshold=3, random_bytes=seeded_random_bytes(1))
    with pytest.raises(ValueError):
        reconstruct_secret({10: shares[10], 20: shares[20]}, 3)
    corrupted = dict(shares)
    corrupted[40] = (corrupted[40] + 1) % PRIME
    with pytest.raises(ValueError, match="inconsistent"):
        reconstruct_secret(corrupted, 3)


def test_shares_below_threshold_differ_from_the_secret_and_between_runs():
    a = split_secret(7, [1, 2, 3], threshold=2, random_bytes=seeded_random_bytes(2))
    b = split_secret(7, [1, 2, 3], threshold=2, random_bytes=seeded_random_bytes(3))
    assert a[1] != 7 and a[1] != b[1]


def test_share_bytes_round_trip_and_validation():
    assert share_from_bytes(share_to_bytes(PRIME - 1)) == PRIME - 1
    with pytest.raises(ValueError):
        share_from_bytes(b"\xff" * 66)  # 2^528 - 1 >= p
    with pytest.raises(ValueError):
        share_from_bytes(b"\x00" * 65)
    with pytest.raises(ValueError):
        split_secret(1, [1, 1, 2], 2, seeded_random_bytes(0))
