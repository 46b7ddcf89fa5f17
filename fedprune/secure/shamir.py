"""Shamir secret sharing over the prime field GF(p), p = 2^521 - 1 (a Mersenne prime).

A secret ``s < p`` is the constant term of a random polynomial ``f`` of degree ``threshold - 1``;
the share of the party with evaluation point ``x`` (nonzero, distinct) is ``f(x)``. Any ``threshold``
shares determine ``s`` by Lagrange interpolation at 0; fewer reveal nothing about it. The 32-byte
secrets of secure aggregation (a PRG seed, an X25519 private key) fit below p with room to spare.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from fedprune.secure.primitives import RandomBytes

logger = logging.getLogger(__name__)

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8)
_SAMPLE_BYTES = SHARE_BYTES + 16  # 128 surplus bits make `% PRIME` statistically uniform


def random_field_element(random_bytes: RandomBytes) -> int:
    """A uniform (to within 2^-128) element of GF(p)."""
    return int.from_bytes(random_bytes(_SAMPLE_BYTES), "big") % PRIME


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    """``f(x) mod p`` for ``f = Σ_i coefficients[i] · x^i`` (Horner)."""
    value = 0
    for coefficient in reversed(coefficients):
        value = (value * x + coefficient) % PRIME
    return value


def split_secret(secret: int, xs: Sequence[int], threshold: int, random_bytes: RandomBytes) -> dict[int, int]:
    """Shares ``{x: f(x)}`` of ``secret`` at the points ``xs``, any ``threshold`` of which recover it."""
    if not 0 <= secret < PRIME:
        raise ValueError("secret must be in [0, p)")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("evaluation points must be distinct and in (0, p)")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold must be in [1, {len(xs)}], got {threshold}")
    coefficients = [secret] + [random_field_element(random_bytes) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x) for x in xs}


def interpolate(points: Sequence[tuple[int, int]], x: int) -> int:
    """The value at ``x`` of the unique polynomial of degree ``< len(points)`` through ``points``."""
    value = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                numerator = numerator * (x - xj) % PRIME
                denominator = denominator * (xi - xj) % PRIME
        value = (value + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    return value


def reconstruct_secret(shares: Mapping[int, int], threshold: int) -> int:
    """The secret ``f(0)`` from at least ``threshold`` shares ``{x: f(x)}``.

    Shares beyond the first ``threshold`` (by ``x``) are checked against the interpolated polynomial,
    so corrupted or mismatched shares raise ``ValueError`` instead of yielding a wrong secret.
    """
    if len(shares) < threshold:
        raise ValueError(f"need {threshold} shares to reconstruct, got {len(shares)}")
    points = sorted(shares.items())
    basis = points[:threshold]
    for x, y in points[threshold:]:
        if interpolate(basis, x) != y % PRIME:
            raise ValueError(f"share at x={x} is inconsistent with the others")
    return interpolate(basis, 0)


def share_to_bytes(share: int) -> bytes:
    """A share value as 66 big-endian bytes."""
    return share.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    """Parse ``share_to_bytes``'s output (raises ValueError on a wrong length or an out-of-field value)."""
    if not isinstance(data, bytes) or len(data) != SHARE_BYTES:
        raise ValueError(f"a share must be {SHARE_BYTES} bytes")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise ValueError("share value outside the field")
    return value
