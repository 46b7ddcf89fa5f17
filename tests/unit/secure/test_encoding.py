import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from fedprune.secure.encoding import FixedPoint, IntegerCode, TwoLimbFixedPoint, moment_clip, to_signed


def _modular_sum(encoded: list[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(encoded[0])
    for y in encoded:
        total += y  # uint64 wraps modulo 2^64
    return total


def test_round_trip_of_representable_values_is_exact():
    code = FixedPoint(scale_bits=8, clip=100.0, max_clients=4)
    x = np.array([1.5, -2.25, 0.0, 99.0, -100.0, 1 / 256])
    y = code.encode(x)
    assert y.dtype == np.uint64
    assert y[1] == np.uint64(2**64 - 576)  # -2.25 · 256 in two's complement
    assert code.decode_sum(y, 1).tolist() == x.tolist()
    # torch input gives the same code and is not modified
    t = torch.tensor(x)
    assert np.array_equal(code.encode(t), y) and t.tolist() == x.tolist()


def test_values_beyond_clip_are_clipped_and_logged_with_counts(caplog):
    code = FixedPoint(scale_bits=4, clip=2.0, max_clients=2)
    with caplog.at_level("WARNING", logger="fedprune.secure.encoding"):
        assert code.decode_sum(code.encode(np.array([5.0, -7.0, 1.0])), 1).tolist() == [2.0, -2.0, 1.0]
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "clipped 2 of 3 values" in caplog.records[0].getMessage()


def test_worst_case_rounding_error_is_reached_and_not_exceeded():
    s, n = 4, 5
    code = FixedPoint(scale_bits=s, clip=100.0, max_clients=8)
    # x · 2^s = 2m + 1/2 with m even rounds (half to even) down by exactly half a unit.
    x = np.array([(2 * m + 0.5) / 2**s for m in (0, 2, 4, 10)] + [-(2 * 6 + 0.5) / 2**s])
    decoded = code.decode_sum(_modular_sum([code.encode(x)] * n), n)
    error = np.abs(decoded - n * x)
    assert code.error_bound(n) == n * 2.0 ** -(s + 1)
    assert np.all(error == code.error_bound(n))  # the bound is attained, i.e. tight


def test_random_inputs_stay_within_the_stated_bound():
    rng = np.random.default_rng(0)
    n, s = 7, 10
    code = FixedPoint(scale_bits=s, clip=50.0, max_clients=n)
    xs = [rng.uniform(-50, 50, size=300) for _ in range(n)]
    decoded = code.decode_sum(_modular_sum([code.encode(x) for x in xs]), n)
    errors = [abs(Fraction(float(d)) - sum(Fraction(float(x[i])) for x in xs)) for i, d in enumerate(decoded)]
    assert max(errors) <= Fraction(n, 2 ** (s + 1))
    assert max(errors) > Fraction(n, 2 ** (s + 1)) / 4  # rounding errors really occur


def test_integer_counts_are_exact_beyond_float64_precision():
    code = IntegerCode(max_abs=2**59, max_clients=8)
    counts = [np.array([2**59 - 1, -(2**59) + 3, 7, 0], dtype=np.int64) for _ in range(8)]
    counts[3] = np.array([2**59 - 3, -5, -7, 1], dtype=np.int64)
    total = code.decode_sum(_modular_sum([code.encode(c) for c in counts]), 8)
    expected = [sum(int(c[i]) for c in counts) for i in range(4)]
    assert total.tolist() == expected
    assert float(expected[0]) != expected[0]  # float64 could not hold this sum exactly


def test_mask_votes_from_bools():
    code = IntegerCode(max_abs=1, max_clients=3)
    votes = [torch.tensor([True, False, True]), torch.tensor([True, True, False]), torch.tensor([1, 0, 0])]
    assert code.decode_sum(_modular_sum([code.encode(v) for v in votes]), 3).tolist() == [3, 1, 1]


def test_overflow_guard():
    FixedPoint(scale_bits=30, clip=2.0**31, max_clients=2)  # 2 · 2^61 fits below 2^63
    with pytest.raises(OverflowError):
        FixedPoint(scale_bits=30, clip=2.0**31, max_clients=4)  # 4 · 2^61 = 2^63 would wrap
    with pytest.raises(OverflowError):
        IntegerCode(max_abs=2**62, max_clients=2)
    FixedPoint(scale_bits=4, clip=100.0, max_clients=20, modulus_bits=16)  # 20 · 1600 <= 32767
    with pytest.raises(OverflowError):
        FixedPoint(scale_bits=4, clip=100.0, max_clients=21, modulus_bits=16)


def test_for_bound_picks_the_finest_safe_scale():
    code = FixedPoint.for_bound(clip=1000.0, max_clients=16)
    with pytest.raises(OverflowError):
        FixedPoint(code.scale_bits + 1, 1000.0, 16)
    # the worst case (all clients at +clip, or all at -clip) decodes without wrapping
    for sign in (1.0, -1.0):
        y = _modular_sum([code.encode(np.array([sign * 1000.0]))] * 16)
        assert code.decode_sum(y, 16).tolist() == [sign * 16000.0]
    # one more summand than declared is refused rather than silently wrapped
    with pytest.raises(ValueError):
        code.decode_sum(y, 17)


def test_encode_rejects_bad_values():
    with pytest.raises(ValueError):
        FixedPoint(8, 1.0, 2).encode(np.array([math.nan]))
    with pytest.raises(ValueError):
        IntegerCode(max_abs=10, max_clients=2).encode(np.array([11]))
    with pytest.raises(TypeError):
        IntegerCode(max_abs=10, max_clients=2).encode(np.array([1.5]))


def test_small_modulus_is_reduced_and_decoded_signed():
    code = FixedPoint(scale_bits=2, clip=10.0, max_clients=3, modulus_bits=12)
    y = code.encode(np.array([-1.0, 2.5]))
    assert y.tolist() == [2**12 - 4, 10]
    assert to_signed(np.array([2**12 - 4], dtype=np.uint64), 12).tolist() == [-4]
    with pytest.raises(ValueError):
        code.decode_sum(np.array([2**12], dtype=np.uint64), 1)


def test_moment_clip_bounds_gram_entries():
    x = torch.tensor([[2.0, -2.0], [1.0, 2.0], [-2.0, 0.5]])  # (tokens, in), |x| <= 2
    assert moment_clip(3, 2.0) == 12.0
    assert float((x.T @ x).abs().max()) <= moment_clip(3, 2.0)


def _exact_error(decoded: np.ndarray, xs: list[np.ndarray]) -> list[Fraction]:
    return [abs(Fraction(float(d)) - sum(Fraction(float(x[i])) for x in xs)) for i, d in enumerate(decoded)]


def test_two_limb_words_hand_checked():
    # s = 2: 1.3 · 4 = 5.2 = 5 + 0.2; -0.75 · 4 = -3 = -3 + 0 ; -0.1 · 4 = -0.4 = -1 + 0.6
    code = TwoLimbFixedPoint(FixedPoint(scale_bits=2, clip=10.0, max_clients=2, modulus_bits=16))
    assert code.low_bits == 13  # 2 · 2^13 <= 2^15 - 1 < 2 · 2^14
    y = code.encode(np.array([1.3, -0.75, -0.1]))
    assert y.dtype == np.uint64 and y.shape == (6,)
    assert y[:3].tolist() == [5, 2**16 - 3, 2**16 - 1]
    assert y[3:].tolist() == [round(0.2 * 2**13), 0, round(0.6 * 2**13)]  # 1638, 0, 4915
    # sums of two sites decode within the stated bound
    decoded = code.decode_sum((y + y) & np.uint64(2**16 - 1), 2)
    assert np.all(np.abs(decoded - 2 * np.array([1.3, -0.75, -0.1])) <= code.error_bound(2, decoded))


def test_two_limb_sum_is_exact_to_float64_where_one_word_is_not():
    rng = np.random.default_rng(1)
    n, clip = 8, 8192 * 1000.0**2  # the secagg default's clip for 8 sites of 32 x 256 tokens
    one, two = FixedPoint.for_bound(clip, n), TwoLimbFixedPoint.for_bound(clip, n)
    assert two.scale_bits in (one.scale_bits, one.scale_bits - 1) and two.low_bits == 59
    # Hessian-like entries of very different sizes, both signs, some at the clip
    xs = [
        np.concatenate([rng.normal(0, 1, 200) * 10.0 ** rng.integers(-6, 9, 200), [clip, -clip]])
        for _ in range(n)
    ]
    exact = [sum(Fraction(float(x[i])) for x in xs) for i in range(xs[0].size)]
    two_sum = two.decode_sum(_modular_sum([two.encode(x) for x in xs]), n)
    one_sum = one.decode_sum(_modular_sum([one.encode(x) for x in xs]), n)
    errors = _exact_error(two_sum, xs)
    bounds = two.error_bound(n, two_sum)
    assert all(e <= Fraction(float(b)) for e, b in zip(errors, bounds, strict=True))
    # relative to float64 precision of each exact sum: within a few ulps (one word is far coarser)
    rel = [float(e / abs(t)) for e, t in zip(errors, exact, strict=True) if t != 0]
    assert max(rel) < 1e-15
    rel_one = [float(e / abs(t)) for e, t in zip(_exact_error(one_sum, xs), exact, strict=True) if t != 0]
    assert max(rel_one) > 1e4 * max(rel)


def test_two_limb_high_words_cannot_overflow_at_the_clip():
    code = TwoLimbFixedPoint.for_bound(clip=1000.0, max_clients=16)
    x = np.array([-1000.0, 1000.0, -999.9999999])
    decoded = code.decode_sum(_modular_sum([code.encode(x)] * 16), 16)
    assert np.allclose(decoded, 16 * x, rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="no number of values"):
        code.decode_sum(code.encode(x)[:5], 1)


def test_packed_low_parts_hand_checked():
    # s = 2, k = 16: two 8-bit low fields per word; 2 sites: 2 · 2^6 <= 2^8 - 1 < 2 · 2^7 -> low_bits 6
    # 1.3 · 4 = 5 + 0.2; -0.75 · 4 = -3 + 0; -0.1 · 4 = -1 + 0.6 -> low parts rint(0.2·64)=13, 0, rint(0.6·64)=38
    code = TwoLimbFixedPoint(
        FixedPoint(scale_bits=2, clip=10.0, max_clients=2, modulus_bits=16), low_per_word=2
    )
    assert (code.field_bits, code.low_bits, code.words_per_value) == (8, 6, 1.5)
    y = code.encode(np.array([1.3, -0.75, -0.1]))
    assert y.dtype == np.uint64 and y.shape == (5,) == (code.encoded_length(3),)
    assert y[:3].tolist() == [5, 2**16 - 3, 2**16 - 1]
    assert y[3:].tolist() == [13 | (0 << 8), 38]  # fields (13, 0) and (38, padding 0)
    decoded = code.decode_sum((y + y) & np.uint64(2**16 - 1), 2)
    assert np.all(np.abs(decoded - 2 * np.array([1.3, -0.75, -0.1])) <= code.error_bound(2, decoded))
    with pytest.raises(ValueError, match="no number of values"):
        code.decode_sum(y[:4], 1)  # 4 words encode no whole number of values


@pytest.mark.parametrize("modulus_bits", [64, 62])
def test_packed_low_parts_never_carry_at_the_clip(modulus_bits):
    n = 8
    code = TwoLimbFixedPoint.for_bound(1000.0, n, modulus_bits, low_per_word=2)
    assert code.low_bits == modulus_bits // 2 - 4  # n · 2^low_bits < 2^field_bits <= n · 2^(low_bits + 1)
    unit = math.ldexp(1.0, -code.scale_bits)
    # r = 1 - 2^-40 rounds the low part up to 2^low_bits: both fields of the first word at their largest
    x = np.array([(4 - 2.0**-40) * unit, (5 - 2.0**-40) * unit, -1000.0, 1000.0, 0.5 * unit])
    words = code.encode(x)
    assert words[5:].tolist() == [
        (1 << code.low_bits) * (1 + (1 << code.field_bits)),
        0,
        1 << (code.low_bits - 1),
    ]
    total = _modular_sum([words] * n) & np.uint64(2**modulus_bits - 1)
    decoded = code.decode_sum(total, n)
    assert np.all(np.abs(decoded - n * x) <= code.error_bound(n, decoded))


def test_word_and_a_half_sum_is_far_finer_than_one_word():
    rng = np.random.default_rng(2)
    n, clip = 8, 8192 * 1000.0**2  # the secagg default's clip for 8 sites of 32 x 256 tokens
    one, half = FixedPoint.for_bound(clip, n), TwoLimbFixedPoint.for_bound(clip, n, low_per_word=2)
    assert half.low_bits == 28 and half.encoded_length(250) == 375
    # 200 entries of very different sizes and both signs, then 50 as small as block 0's Gram entries
    xs = [
        np.concatenate([rng.normal(0, 1, 200) * 10.0 ** rng.integers(-6, 9, 200), rng.normal(0, 1e-5, 50)])
        for _ in range(n)
    ]
    half_sum = half.decode_sum(_modular_sum([half.encode(x) for x in xs]), n)
    errors = _exact_error(half_sum, xs)
    assert all(e <= Fraction(float(b)) for e, b in zip(errors, half.error_bound(n, half_sum), strict=True))
    one_errors = _exact_error(one.decode_sum(_modular_sum([one.encode(x) for x in xs]), n), xs)
    assert max(errors[200:]) * 2**25 < max(one_errors[200:])  # 28 more bits on the small entries
