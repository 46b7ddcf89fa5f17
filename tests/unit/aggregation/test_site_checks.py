"""Checks of one site's statistics in the clear, on hand-made Stats: what no data gives is refused always;
with federation.robust, non-PSD Gram sums and sites far off the median site are refused, honest sites
with natural variation are not."""

import logging

import pytest
import torch

from fedprune.aggregation.site_checks import (
    ImplausibleStats,
    SiteChecks,
    scale_outliers,
    site_reason,
)
from fedprune.payload import PayloadError, decode_stats, encode_stats
from fedprune.stat_kinds import AFFINE_HESSIAN, HESSIAN, MOMENTS, PSD_TOL, SQ_NORM
from fedprune.stats import BlockStats, Stats, batch_stats


def _gram(matrix) -> dict[str, Stats]:
    return {"mlp.down_proj": Stats("hessian", torch.as_tensor(matrix, dtype=torch.float64), 10)}


def _site(seed: int, scale: float = 1.0, kind: str = "hessian", tokens: int = 64) -> dict[str, Stats]:
    """One site's statistics of two layers from random inputs (site-specific spread and token count)."""
    g = torch.Generator().manual_seed(seed)
    spread = 1.0 + 0.5 * torch.rand(1, generator=g)  # honest sites differ by up to 1.5x in norm
    x = torch.randn(tokens + 8 * seed, 6, generator=g) * spread * scale**0.5
    return {"self_attn.q_proj": batch_stats(kind, x), "mlp.up_proj": batch_stats(kind, 2 * x)}


def test_non_psd_gram_is_refused_only_by_the_robust_check():
    bad = _gram([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and -1, a positive diagonal
    assert site_reason(bad) is None  # nothing per-entry is impossible
    reason = site_reason(bad, psd=True)
    assert reason.startswith("mlp.down_proj: not positive semi-definite: smallest eigenvalue -1,")
    with pytest.raises(ImplausibleStats, match="mlp.down_proj: not positive semi-definite"):
        SiteChecks(robust=True).check(bad)
    SiteChecks(robust=False).check(bad)
    assert issubclass(ImplausibleStats, PayloadError)  # a rejected reply, as for malformed ones


def test_psd_tolerance_is_relative_to_the_trace():
    for trace in (1.0, 1e6):
        for below, refused in [(0.1, False), (10.0, True)]:
            c = (below * PSD_TOL) ** 0.5  # [[1, c], [c, 0]]: smallest eigenvalue ≈ -c² = -below · tol
            matrix = trace * torch.tensor([[1.0, c], [c, 0.0]], dtype=torch.float64)
            assert torch.linalg.eigvalsh(matrix)[0] / trace == pytest.approx(-below * PSD_TOL, rel=1e-4)
            assert (site_reason(_gram(matrix), psd=True) is not None) is refused, (trace, below)
    assert site_reason(_gram(torch.diag(torch.tensor([1.0, 1.0, 0.0]))), psd=True) is None  # singular
    assert site_reason(_gram(torch.zeros(3, 3)), psd=True) is None  # a layer that got only zeros
    assert site_reason(_gram([[0.0, 1.0], [1.0, 0.0]]), psd=True).endswith("an all-zero diagonal")


def test_honest_gram_sums_pass_even_when_singular():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 64, generator=g) * (1 + 30 * (torch.rand(64, generator=g) < 0.05))  # 16 tokens
    for kind in (HESSIAN, AFFINE_HESSIAN):
        stats = {"mlp.down_proj": batch_stats(kind.name, x)}
        assert torch.linalg.eigvalsh(stats["mlp.down_proj"].total)[0] < 1e-6  # rank 16 (17) of 64 (65)
        assert site_reason(stats, psd=True) is None


def test_negative_sums_of_squares_are_refused_always():
    diagonal = _gram([[1.0, 0.0], [0.0, -0.5]])
    assert site_reason(diagonal) == "mlp.down_proj: negative diagonal entry -0.5 (a sum of squares)"
    sq = {"mlp.up_proj": Stats("sq_norm", torch.tensor([1.0, -2.0], dtype=torch.float64), 4)}
    with pytest.raises(PayloadError, match="negative sum of squares for mlp.up_proj"):
        decode_stats(encode_stats(sq), "sq_norm", {"mlp.up_proj": 2}, 4)  # refused while decoding
    assert site_reason(sq) is None  # so nothing more to refuse here
    moments = torch.tensor([[4.0, 1.0], [1.0, 1.0]], dtype=torch.float64)  # Σx=4 but Σx²=1 over 2 tokens
    reason = site_reason({"mlp.down_proj": Stats("moments", moments, 2)})
    assert reason.startswith("mlp.down_proj: (Σx)² > count · Σx² for input feature 0")
    assert site_reason({"l": batch_stats("moments", torch.full((5, 3), 2.0))}) is None  # equality holds


def test_affine_hessian_constant_entry_must_be_the_count():
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(1))
    stats = batch_stats("affine_hessian", x)
    assert stats.total[-1, -1] == 12 and site_reason({"l": stats}) is None
    forged = Stats("affine_hessian", stats.total.clone(), 24)  # claims twice the tokens
    assert site_reason({"l": forged}) == "l: constant entry 12 is not the token count 24"


def test_token_scale_is_the_mean_squared_norm_for_every_kind():
    x = torch.randn(3, 16, 5, generator=torch.Generator().manual_seed(2))
    expected = float(x.double().pow(2).sum()) / 48  # Σ_t ‖x_t‖² / tokens
    for kind in (SQ_NORM, HESSIAN, MOMENTS, AFFINE_HESSIAN):
        stats = batch_stats(kind.name, x)
        assert kind.token_scale(stats.total, stats.count) == pytest.approx(expected, rel=1e-6), kind


@pytest.mark.parametrize("kind", ["sq_norm", "hessian", "affine_hessian"])
def test_a_site_1000x_bigger_among_four_is_refused_honest_variation_is_not(kind):
    sites = {100 + s: _site(s, kind=kind) for s in range(4)}
    assert scale_outliers(sites, 10.0) == {}  # different spreads and token counts: all within 10x
    sites[102] = _site(2, scale=1000.0, kind=kind)
    got = scale_outliers(sites, 10.0)
    assert list(got) == [102]
    assert got[102].startswith("self_attn.q_proj: size per token") and "(and 1 more layer)" in got[102]
    tiny = {**sites, 102: _site(2, scale=1e-3, kind=kind)}  # too small is off too
    assert list(scale_outliers(tiny, 10.0)) == [102]


def test_scale_reference_is_the_median_not_the_mean():
    sites = {n: _site(n) for n in range(5)}
    sites[0], sites[1] = _site(0, scale=1e6), _site(1, scale=1e6)  # two of five far off: the mean moves
    assert sorted(scale_outliers(sites, 10.0)) == [0, 1]


def test_scale_check_uses_shared_entries_once_per_layer():
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(3))
    shared = batch_stats("sq_norm", x)
    block = BlockStats({("self_attn.k_proj", "self_attn.q_proj"): shared})
    sites = {
        0: block,
        1: block,
        2: {
            "self_attn.k_proj": shared,
            "self_attn.q_proj": Stats("sq_norm", shared.total * 50, shared.count),
        },
    }
    assert list(scale_outliers(sites, 10.0)) == [2] and "self_attn.q_proj" in scale_outliers(sites, 10.0)[2]


def test_screen_needs_robust_and_three_sites_and_says_when_it_skips(caplog):
    sites = {0: _site(0), 1: _site(1, scale=1000.0)}
    assert SiteChecks(robust=False).screen({**sites, 2: _site(2)}) == {}
    checks = SiteChecks(robust=True)
    with caplog.at_level(logging.WARNING, logger="fedprune.aggregation.site_checks"):
        assert checks.screen(sites) == {} and checks.screen(sites) == {}
    skipped = [r.getMessage() for r in caplog.records if "skips the scale check" in r.getMessage()]
    assert len(skipped) == 1 and "a sum of 2 site(s)" in skipped[0]  # logged, once
    got = checks.screen({**sites, 2: _site(2)})
    assert list(got) == [1] and got[1].startswith("implausible statistics: ")
    assert list(SiteChecks(robust=True, scale=1e4).screen({**sites, 2: _site(2)})) == []
