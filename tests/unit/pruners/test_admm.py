"""ADMM reconstruction against direct least-squares solves, hand-computed schedules and valid masks."""

import pytest
import torch

from fedprune.config import ConfigError, PrunerSpec, build_pruner
from fedprune.masks import Pattern, select_unstructured
from fedprune.pruners import get_pruner
from fedprune.pruners.admm import (
    admm_reconstruct,
    gradual_sparsity,
    input_norms,
    normalized_damped_gram,
    ridge_inverse,
    step_mask,
)
from fedprune.stats import batch_stats

UNSTRUCTURED = Pattern("unstructured")
TWO_FOUR = Pattern("nm", 2, 4)


def _layer(seed=0, tokens=300, d_in=16, d_out=6):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=gen, dtype=torch.float64)
    x = x @ torch.randn(d_in, d_in, generator=gen, dtype=torch.float64)  # correlated inputs
    x[:, 0] *= 10.0  # unequal scales
    w = torch.randn(d_out, d_in, generator=gen)
    return x, w


def _masked_least_squares(w0: torch.Tensor, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per row, argmin (w − w₀)ᵀ H (w − w₀) with w = 0 off ``keep``: w_K = H_KK⁻¹ (H w₀)_K."""
    w0, h = w0.to(torch.float64), h.to(torch.float64)
    out = torch.zeros_like(w0)
    for r in range(w0.shape[0]):
        k = keep[r]
        out[r, k] = torch.linalg.solve(h[k][:, k], (h @ w0[r])[k])
    return out


def test_gradual_sparsity_is_the_cubic_schedule():
    assert gradual_sparsity(0, 3, 0.5) == pytest.approx(0.5 * (1 - (2 / 3) ** 3))
    assert gradual_sparsity(1, 3, 0.5) == pytest.approx(0.5 * (1 - (1 / 3) ** 3))
    assert gradual_sparsity(2, 3, 0.5) == 0.5 and gradual_sparsity(7, 3, 0.5) == 0.5
    values = [gradual_sparsity(k, 15, 0.7) for k in range(15)]
    assert values == sorted(values) and values[-1] == 0.7


def test_fixed_mask_reaches_the_least_squares_optimum():
    x, w = _layer()
    h = x.T @ x + 0.5 * torch.eye(16, dtype=torch.float64)
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) > 0.5
    h = h / h.diagonal().mean()
    z, mask = admm_reconstruct(w, h, ridge_inverse(h, 1.0), keep, 0.5, UNSTRUCTURED, 3000, 0, 1.0, "row")
    assert torch.equal(mask, keep) and torch.all(z[~keep] == 0)
    expected = _masked_least_squares(w, h, keep)
    torch.testing.assert_close(z.double(), expected, atol=2e-4, rtol=2e-4)


def test_pruner_with_fixed_wanda_mask_solves_the_damped_problem_in_original_units():
    """gradual=0: the Wanda mask of the dense weights, then the optimum of (w − w₀)(G + λ·diag G)(w − w₀)ᵀ
    on it (normalised dampening λ·mean(diag D⁻¹GD⁻¹) = λ is λ·diag G in the original units)."""
    x, w = _layer(seed=1)
    stats = batch_stats("hessian", x.float())
    pruner = get_pruner("admm", iterations=400, gradual=0, percdamp=0.1)
    result = pruner.prune(w, stats, 0.5, UNSTRUCTURED)
    g = stats.total
    keep = select_unstructured(w.abs() * g.diagonal().sqrt().float(), 0.5, "row")
    assert torch.equal(result.mask, keep)
    expected = _masked_least_squares(w, g + 0.1 * torch.diag(g.diagonal()), keep)
    torch.testing.assert_close(result.weight.double(), expected, atol=1e-3, rtol=1e-3)


def _error(w0, w, g):
    d = (w0 - w).double()
    return torch.einsum("ri,ij,rj->", d, g, d).item()


@pytest.mark.parametrize("pattern,sparsity", [(UNSTRUCTURED, 0.5), (UNSTRUCTURED, 0.7), (TWO_FOUR, None)])
def test_gradual_admm_beats_the_wanda_mask_and_keeps_the_pattern(pattern, sparsity):
    x, w = _layer(seed=2, d_in=32, d_out=8)
    stats = batch_stats("hessian", x.float())
    result = get_pruner("admm").prune(w, stats, sparsity, pattern)
    assert torch.all(result.weight[~result.mask] == 0)
    if pattern.kind == "nm":
        assert torch.all(result.mask.reshape(8, -1, 4).sum(-1) == 2)
    else:
        assert torch.all(result.mask.sum(1) == 32 - int(32 * sparsity))  # per row, exact
    wanda = get_pruner("wanda").prune(w, batch_stats("sq_norm", x.float()), sparsity, pattern)
    assert _error(w, result.weight, stats.total) < 0.5 * _error(w, wanda.weight, stats.total)


def test_step_mask_nm_keeps_the_top_n_and_prunes_the_rest_gradually():
    v = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.1, 0.2, 5.0, 6.0]])
    assert torch.equal(
        step_mask(v, 0.25, 0.5, TWO_FOUR, "row"),  # 2 of 8 pruned: the lowest outside each top 2
        torch.tensor([[True, True, True, True, False, False, True, True]]),
    )
    assert torch.equal(
        step_mask(v, 0.5, 0.5, TWO_FOUR, "row"),
        torch.tensor([[True, True, False, False, False, False, True, True]]),
    )


def test_dead_inputs_are_pruned_and_stay_finite():
    x, w = _layer(seed=4)
    x[:, 3] = 0.0
    stats = batch_stats("hessian", x.float())
    assert input_norms(stats.total)[3] == 1.0
    h = normalized_damped_gram(stats.total, input_norms(stats.total), 0.1)
    assert torch.allclose(h[3], torch.eye(16, dtype=torch.float64)[3] * 1.1)
    result = get_pruner("admm").prune(w, stats, 0.5, UNSTRUCTURED)
    assert torch.isfinite(result.weight).all() and torch.all(result.weight[:, 3] == 0)
    assert w[0, 3] != 0  # the caller's weight untouched


@pytest.mark.parametrize(
    "params,match",
    [
        ({"iterations": 0}, "iterations"),
        ({"gradual": 30}, "gradual"),
        ({"rho": 0}, "rho"),
        ({"group": "column"}, "group"),
        ({"steps": 3}, "steps"),
    ],
)
def test_bad_parameters_name_the_key(params, match):
    with pytest.raises(ConfigError, match=f"pruner.params.*{match}"):
        build_pruner(PrunerSpec(name="admm", params=params))
