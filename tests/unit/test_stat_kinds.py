"""Statistic kind objects against direct formulas: compute, wire layout, validation, DP facts."""

import math

import numpy as np
import pytest
import torch

from fedprune.payload import PayloadError, decode_stats, encode_stats
from fedprune.secure.codec import slot_sizes
from fedprune.secure.dp import clip_tokens, psd_project, window_sensitivity
from fedprune.stat_kinds import (
    AFFINE_HESSIAN,
    GRAM_TILE,
    HESSIAN,
    MOMENTS,
    SQ_NORM,
    STAT_KINDS,
    StatKind,
    get_stat_kind,
    gram_upper_add_,
    moment_sums,
)
from fedprune.stats import batch_stats, empty_stats, gram_sum, sq_norm_sum

KINDS = [SQ_NORM, HESSIAN]


def test_registry_resolves_names_and_objects():
    assert STAT_KINDS == {
        "sq_norm": SQ_NORM,
        "hessian": HESSIAN,
        "moments": MOMENTS,
        "affine_hessian": AFFINE_HESSIAN,
    }
    assert get_stat_kind("sq_norm") is SQ_NORM and get_stat_kind(HESSIAN) is HESSIAN
    assert all(isinstance(k, StatKind) for k in KINDS)
    with pytest.raises(
        KeyError,
        match=r"unknown statistic 'nope'; known: \['affine_hessian', 'hessian', 'moments', 'sq_norm'\]",
    ):
        get_stat_kind("nope")
    assert batch_stats(HESSIAN, torch.ones(2, 3)).kind == "hessian"  # Stats.kind stays the name
    assert empty_stats(SQ_NORM, 5).total.shape == (5,)


def test_compute_equals_direct_formulas_in_float64():
    gen = torch.manual_seed(0)
    x = torch.randn(3, 7, 5, dtype=torch.float64, generator=gen)  # (windows, tokens, in)
    flat = x.reshape(-1, 5)  # (tokens, in)
    assert torch.allclose(SQ_NORM.compute(x), (flat**2).sum(dim=0), rtol=1e-13, atol=0)
    assert torch.allclose(HESSIAN.compute(x), flat.T @ flat, rtol=1e-13, atol=1e-13)
    x32 = x.float()
    ref32 = x32.double().reshape(-1, 5)
    assert torch.allclose(HESSIAN.compute(x32), ref32.T @ ref32, rtol=1e-5, atol=1e-5)
    assert SQ_NORM.compute(x32).dtype == HESSIAN.compute(x32).dtype == torch.float64


@pytest.mark.parametrize("shape", [(4, 6), (2, 3, 6), (2, 2, 3, 6)])
def test_compute_is_bit_identical_to_the_stat_functions(shape):
    x = torch.randn(*shape)
    assert torch.equal(SQ_NORM.compute(x), sq_norm_sum(x))
    assert torch.equal(HESSIAN.compute(x), gram_sum(x))
    assert SQ_NORM.shape(6) == (6,) and HESSIAN.shape(6) == (6, 6)


@pytest.mark.parametrize("kind", [SQ_NORM, HESSIAN, MOMENTS, AFFINE_HESSIAN], ids=lambda k: k.name)
@pytest.mark.parametrize("width", [8, GRAM_TILE + 44])  # one strip; two, the second narrower
def test_accumulate_equals_adding_computed_sums_bit_for_bit(kind, width):
    """Running sums in place (upper strips, mirrored once) == Σ of compute per batch, as torch.equal."""
    gen = torch.Generator().manual_seed(4)
    batches = [torch.randn(w, 5, width, generator=gen) * 3 for w in (2, 1, 3)]  # (windows, tokens, in)
    total = None
    for x in batches:
        total = kind.accumulate_(total, x)
    total = kind.finish_(total)
    expected = kind.compute(batches[0])
    for x in batches[1:]:
        expected = expected + kind.compute(x)
    assert total.dtype == torch.float64 and torch.equal(total, expected)
    if kind.name.endswith("hessian"):
        flat = torch.cat([b.reshape(-1, width) for b in batches]).double()  # (tokens, in)
        if kind is AFFINE_HESSIAN:
            flat = torch.cat([flat, torch.ones(len(flat), 1, dtype=torch.float64)], dim=1)
        torch.testing.assert_close(total, flat.T @ flat, rtol=1e-5, atol=1e-4)  # a direct product


def test_gram_upper_add_refuses_a_total_of_the_wrong_shape():
    with pytest.raises(ValueError, match="float64 \\(4, 4\\) total"):
        gram_upper_add_(torch.zeros(3, 3, dtype=torch.float64), torch.randn(2, 4))


def test_wire_layout_against_numpy_upper_triangle():
    x = torch.randn(9, 4, dtype=torch.float64)
    total = HESSIAN.compute(x)
    rows, cols = np.triu_indices(4)  # row-major upper triangle, diagonal included
    wire = HESSIAN.to_wire(total)
    assert HESSIAN.wire_length(4) == 10 and wire.shape == (10,)
    assert np.array_equal(wire.numpy(), total.numpy()[rows, cols])
    assert torch.equal(HESSIAN.from_wire(wire, 4), total)
    v = SQ_NORM.compute(x)
    assert SQ_NORM.wire_length(4) == 4 and torch.equal(SQ_NORM.from_wire(SQ_NORM.to_wire(v), 4), v)


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_wire_length_rejected(kind):
    n = 3
    with pytest.raises(ValueError, match="wire length"):
        kind.from_wire(torch.zeros(kind.wire_length(n) + 1, dtype=torch.float64), n)
    with pytest.raises(ValueError, match="wire length"):
        kind.from_wire(torch.zeros(1, kind.wire_length(n), dtype=torch.float64), n)


def test_validation_rejects_impossible_sums():
    good = torch.tensor([0.0, 2.0, 5.0], dtype=torch.float64)
    assert SQ_NORM.invalid_reason(good) is None
    assert "negative" in SQ_NORM.invalid_reason(torch.tensor([1.0, -1e-9], dtype=torch.float64))
    assert "NaN" in SQ_NORM.invalid_reason(torch.tensor([1.0, math.nan], dtype=torch.float64))
    assert "NaN" in SQ_NORM.invalid_reason(torch.tensor([math.inf], dtype=torch.float64))
    assert SQ_NORM.invalid_reason(torch.zeros(2, 2, dtype=torch.float64)) is not None
    h = torch.eye(3, dtype=torch.float64)
    assert HESSIAN.invalid_reason(h) is None
    h[0, 1] = math.nan
    assert "NaN" in HESSIAN.invalid_reason(h)
    assert HESSIAN.invalid_reason(torch.zeros(2, 3, dtype=torch.float64)) is not None


def test_decode_rejects_negative_sum_of_squares_by_layer():
    s = batch_stats("sq_norm", torch.randn(4, 3))
    arrays = encode_stats({"a": s, "b": s})
    arrays["total.0"] = arrays["total.0"].copy()
    arrays["total.0"][1] = -0.5
    with pytest.raises(PayloadError, match="negative sum of squares for a"):
        decode_stats(arrays, "sq_norm", {"a": 3, "b": 3}, max_count=4)


def test_noisy_post_processing():
    noisy = torch.tensor([-0.0, -2.0, 0.0, 3.5], dtype=torch.float64)
    clamped = SQ_NORM.project_noisy(noisy)
    assert clamped.tolist() == [0.0, 0.0, 0.0, 3.5] and not torch.signbit(clamped).any()
    assert np.array_equal(clamped.numpy(), np.maximum(noisy.numpy(), 0.0))  # what the server did before
    m = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)  # eigenvalues 3 and -1
    projected = HESSIAN.project_noisy(m)
    assert torch.equal(projected, psd_project(m))
    assert torch.allclose(projected, torch.full((2, 2), 1.5, dtype=torch.float64), atol=1e-12)
    assert torch.linalg.eigvalsh(projected).min() >= -1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_decode_noisy_projects_before_validating(kind):
    x = torch.randn(6, 3, dtype=torch.float64)
    shared = batch_stats(kind, x)
    arrays = encode_stats({"a": shared, "b": shared})
    arrays["total.0"] = arrays["total.0"] - 1e3  # noise pushed everything negative
    if kind is SQ_NORM:
        with pytest.raises(PayloadError, match="negative"):
            decode_stats(arrays, kind, {"a": 3, "b": 3}, max_count=6)
    got = decode_stats(arrays, kind, {"a": 3, "b": 3}, max_count=6, noisy=True)
    expected = kind.project_noisy(kind.from_wire(torch.from_numpy(arrays["total.0"]), 3))
    assert got["a"] is got["b"] and torch.equal(got["a"].total, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_window_sensitivity_per_kind(kind):
    for seq_len, bound, slots in [(1, 2.0, 1), (8, 0.5, 4), (128, 1e-3, 7)]:
        old = math.sqrt(2.0) * seq_len * bound**2 * math.sqrt(slots)  # the formula before kinds
        assert kind.window_sensitivity(seq_len, bound) * math.sqrt(slots) == old
        assert window_sensitivity(seq_len, bound, slots, kind) == old
    # attained: two one-token windows along orthogonal axes, as the kind sends them
    x, y = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    moved = torch.linalg.norm(kind.to_wire(kind.compute(x)) - kind.to_wire(kind.compute(y)))
    assert moved.item() == pytest.approx(kind.window_sensitivity(1, 2.0))


def test_slot_sizes_accept_names_and_objects():
    assert slot_sizes("hessian", [0, 1, 0], [4, 3, 4]) == slot_sizes(HESSIAN, [0, 1, 0], [4, 3, 4]) == [10, 6]
    assert slot_sizes(SQ_NORM, [0, 1, 0], [4, 3, 4]) == [4, 3]
    with pytest.raises(KeyError, match="known"):
        slot_sizes("nope", [0], [4])


def test_moments_sum_means_and_squares_and_round_trip_the_wire():
    x = torch.tensor([[[1.0, -2.0], [3.0, 0.5]], [[-1.0, 2.0], [0.0, 1.0]]])  # (windows, tokens, in)
    total = moment_sums(x)
    assert total.dtype == torch.float64
    assert total.tolist() == [[3.0, 1.5], [11.0, 9.25]]
    wire = MOMENTS.to_wire(total)
    assert wire.shape == (MOMENTS.wire_length(2),) and torch.equal(MOMENTS.from_wire(wire, 2), total)
    assert MOMENTS.invalid_reason(torch.tensor([[1.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)) is not None
    projected = MOMENTS.project_noisy(torch.tensor([[-5.0, 1.0], [-1.0, 2.0]], dtype=torch.float64))
    assert projected.tolist() == [[-5.0, 1.0], [0.0, 2.0]]  # signed sums stay, squares clipped at 0


def test_default_sensitivity_is_the_largest_kind():
    assert window_sensitivity(8, 0.5, 2) == max(window_sensitivity(8, 0.5, 2, k) for k in STAT_KINDS)


def test_affine_hessian_sensitivity_bounds_replacing_one_window():
    gen = torch.manual_seed(3)
    limit = window_sensitivity(seq_len=8, bound=1.0, slots=1, kind="affine_hessian")
    assert limit == pytest.approx(math.sqrt(2.0) * 8 * 2.0)
    for _ in range(100):
        a = clip_tokens(torch.randn(8, 4, generator=gen) * 3, 1.0)
        b = clip_tokens(torch.randn(8, 4, generator=gen) * 3, 1.0)
        moved = AFFINE_HESSIAN.to_wire(AFFINE_HESSIAN.compute(a)) - AFFINE_HESSIAN.to_wire(
            AFFINE_HESSIAN.compute(b)
        )
        assert torch.linalg.norm(moved) <= limit + 1e-9
