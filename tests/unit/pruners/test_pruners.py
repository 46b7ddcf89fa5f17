import pytest
import torch

from fedprune.masks import Pattern, parse_pattern, prune_lowest, sparsity_of
from fedprune.pruners import PRUNERS, get_pruner
from fedprune.pruners.sparsegpt import (
    damped_hessian,
    inverse_hessian_factor,
    lower_triangular_inverse,
    obs_prune,
)
from fedprune.stats import Stats, batch_stats

UNSTRUCTURED = Pattern("unstructured")
TWO_FOUR = Pattern("nm", 2, 4)


def test_registry_names_and_unknown():
    assert {"magnitude", "wanda", "sparsegpt"} <= set(PRUNERS)
    with pytest.raises(KeyError, match="unknown pruner"):
        get_pruner("nope")


def test_magnitude_exact_mask():
    w = torch.tensor([[1.0, -5.0, 2.0, 0.5], [-3.0, 4.0, 0.1, 6.0]])
    result = get_pruner("magnitude").prune(w, None, 0.5, UNSTRUCTURED)
    keep = torch.tensor([[False, True, False, False], [True, True, False, True]])
    assert torch.equal(result.mask, keep)
    assert torch.equal(result.weight, w * keep)
    assert w[0, 0] == 1.0  # input untouched


def test_wanda_uses_activation_norms_per_row():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    # Σx² per input = [100, 1, 1, 100] over 1 token: norms [10, 1, 1, 10]
    stats = Stats("sq_norm", torch.tensor([100.0, 1.0, 1.0, 100.0], dtype=torch.float64), 1)
    result = get_pruner("wanda").prune(w, stats, 0.5, UNSTRUCTURED)
    # scores row0 = [10, 2, 3, 40] -> keep 0,3 ; row1 = [40, 3, 2, 10] -> keep 0,3
    keep = torch.tensor([[True, False, False, True], [True, False, False, True]])
    assert torch.equal(result.mask, keep)


def test_wanda_two_four():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0, 1.0, 1.0, 1.0, 1.0]])
    stats = Stats("sq_norm", torch.tensor([16.0, 1, 1, 1, 1, 4, 9, 1], dtype=torch.float64), 1)
    # scores = [4, 2, 3, 4 | 1, 2, 3, 1]: keep {0,3} then {5,6}
    result = get_pruner("wanda").prune(w, stats, 0.0, TWO_FOUR)
    assert result.mask.tolist() == [[True, False, False, True, False, True, True, False]]


def test_wanda_needs_stats():
    with pytest.raises(ValueError, match="sq_norm"):
        get_pruner("wanda").prune(torch.ones(2, 4), None, 0.5, UNSTRUCTURED)


def test_sparsegpt_identity_hessian_is_magnitude_per_block():
    # With H ∝ I the OBS saliency is w² (up to a constant) and no compensation happens.
    w = torch.tensor([[1.0, -5.0, 2.0, 0.5], [-3.0, 4.0, 0.1, 6.0]])
    stats = Stats("hessian", torch.eye(4, dtype=torch.float64) * 10, 5)
    result = get_pruner("sparsegpt").prune(w, stats, 0.5, UNSTRUCTURED)
    keep = torch.tensor([[False, True, False, False], [True, True, False, True]])
    assert torch.equal(result.mask, keep)
    assert torch.allclose(result.weight, w * keep)


def test_sparsegpt_compensates_correlated_input():
    # Two perfectly correlated inputs (x0 == x1): pruning w0 can be fully compensated on w1.
    x = torch.randn(1000, 1)
    x = torch.cat([x, x], dim=1)  # (tokens, 2)
    stats = batch_stats("hessian", x)
    w = torch.tensor([[1.0, 3.0]])
    result = get_pruner("sparsegpt", percdamp=1e-6).prune(w, stats, 0.5, UNSTRUCTURED)
    assert result.mask.tolist() == [[False, True]]
    assert result.weight[0, 1].item() == pytest.approx(4.0, rel=1e-3)


def test_obs_prune_two_four_groups_valid():
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    x = torch.randn(200, 16)
    h = damped_hessian(batch_stats("hessian", x).total * 2 / 200, 0.01)
    new_w, keep = obs_prune(w, inverse_hessian_factor(h), 0.0, TWO_FOUR, blocksize=8)
    assert torch.equal(keep.reshape(6, 4, 4).sum(-1), torch.full((6, 4), 2))
    assert bool((new_w[~keep] == 0).all())
    assert bool((new_w[keep] != w[keep]).any())  # kept weights were updated


def _reconstruction_error(w, new_w, x):
    return ((x @ w.t() - x @ new_w.t()) ** 2).sum().item()


@pytest.mark.parametrize("pattern", [UNSTRUCTURED, TWO_FOUR])
def test_sparsegpt_beats_wanda_and_magnitude_on_reconstruction(pattern):
    torch.manual_seed(0)
    in_features, out_features, tokens = 64, 32, 2048
    mixing = torch.randn(in_features, in_features) / in_features**0.5
    scales = torch.logspace(-1, 1, in_features)
    x = (torch.randn(tokens, in_features) @ mixing) * scales  # correlated, uneven inputs
    w = torch.randn(out_features, in_features)
    errors = {}
    for name, kind in (("magnitude", None), ("wanda", "sq_norm"), ("sparsegpt", "hessian")):
        stats = batch_stats(kind, x) if kind else None
        result = get_pruner(name).prune(w, stats, 0.5, pattern)
        assert sparsity_of(result.mask) == pytest.approx(0.5)
        errors[name] = _reconstruction_error(w, result.weight, x)
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"]


def _obs_reference(w, hinv, prune_mask):
    """The OBS sweep of the SparseGPT paper, one column at a time without lazy blocks, for a fixed mask:
    prune column i, spread its error over the columns after it with row i of the inverse-Hessian factor."""
    w = w.clone().double()
    hinv = hinv.double()
    for i in range(w.shape[1]):
        q = torch.where(prune_mask[:, i], 0.0, w[:, i])
        err = (w[:, i] - q) / hinv[i, i]
        w[:, i:] -= err.reshape(-1, 1) * hinv[i, i:].reshape(1, -1)
        w[:, i] = q
    return w


@pytest.mark.parametrize("pattern", [UNSTRUCTURED, TWO_FOUR])
def test_obs_prune_blocked_sweep_equals_column_by_column_reference(pattern):
    # lazy blocks of 8 over 20 columns (a ragged last block) give the unblocked sweep's weights
    torch.manual_seed(3)
    w = torch.randn(5, 20)
    x = torch.randn(300, 20) @ torch.randn(20, 20)
    factor = inverse_hessian_factor(damped_hessian(batch_stats("hessian", x).total * 2 / 300, 0.01))
    new_w, keep = obs_prune(w, factor, 0.5, pattern, blocksize=8 if pattern is UNSTRUCTURED else 4)
    assert sparsity_of(keep) == pytest.approx(0.5, abs=0.05)
    reference = _obs_reference(w, factor, ~keep)
    assert torch.allclose(new_w.double(), reference, atol=1e-4)
    assert bool((new_w[~keep] == 0).all())


def test_inverse_hessian_factor_hand_checked():
    # H = [[4, 2], [2, 3]]: H⁻¹ = [[3/8, -1/4], [-1/4, 1/2]] = UᵀU with U = [[√(3/8), -1/√6], [0, 1/√3]]
    u = inverse_hessian_factor(torch.tensor([[4.0, 2.0], [2.0, 3.0]], dtype=torch.float64))
    expected = torch.tensor([[(3 / 8) ** 0.5, -(6**-0.5)], [0.0, 3**-0.5]], dtype=torch.float64)
    assert torch.allclose(u, expected, atol=1e-12)


@pytest.mark.parametrize("n, base", [(1, 4), (7, 4), (37, 4), (300, 64)])
def test_lower_triangular_inverse_by_halves_is_the_inverse(n, base):
    torch.manual_seed(n)
    x = torch.randn(4 * n, n, dtype=torch.float64)
    lower = torch.linalg.cholesky(x.T @ x + torch.eye(n, dtype=torch.float64))
    inverse = lower_triangular_inverse(lower, base)
    assert torch.equal(inverse, inverse.tril())
    assert torch.allclose(inverse @ lower, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(inverse, torch.linalg.inv(lower), rtol=1e-10, atol=1e-13)


def test_inverse_hessian_factor_squares_to_the_inverse_beyond_one_block():
    torch.manual_seed(5)
    x = torch.randn(2000, 300, dtype=torch.float64)
    h = damped_hessian(2.0 * x.T @ x / 2000, 0.01)
    u = inverse_hessian_factor(h)
    assert torch.equal(u, u.triu()) and bool((torch.diagonal(u) > 0).all())
    assert torch.allclose(u.T @ u, torch.linalg.inv(h), rtol=1e-9, atol=1e-12)


def _sorted_lowest(scores: torch.Tensor, count: int) -> list[list[bool]]:
    """Reference: per column, the first ``count`` rows of Python's stable sort by (value, NaN last)."""
    rows, cols = scores.shape
    mask = [[False] * cols for _ in range(rows)]
    for c in range(cols):
        column = [float(scores[r, c]) for r in range(rows)]
        order = sorted(
            range(rows), key=lambda r: (column[r] != column[r], column[r] if column[r] == column[r] else 0.0)
        )
        for r in order[:count]:
            mask[r][c] = True
    return mask


@pytest.mark.parametrize("m, count", [(4, 2), (4, 1), (4, 3), (8, 4), (16, 12)])
@pytest.mark.parametrize("values", ["continuous", "ties", "nan"])
def test_group_masks_prune_the_first_rows_of_a_stable_sort_by_column(m, count, values):
    torch.manual_seed(m * 10 + count)
    scores = torch.randn(m, 200)
    if values == "ties":
        scores = torch.randint(0, 3, (m, 200)).float()
    elif values == "nan":
        scores[torch.rand(m, 200) < 0.2] = float("nan")
        scores[0, :20] = float("inf")
    assert (~prune_lowest(scores, count, dim=0)).tolist() == _sorted_lowest(
        scores, count
    )  # SparseGPT's N:M groups


def test_sparsegpt_reuses_factor_only_for_equal_stats():
    torch.manual_seed(4)
    xa, xb = torch.randn(50, 8), torch.randn(50, 8) * 3
    a, a_copy, b = batch_stats("hessian", xa), batch_stats("hessian", xa.clone()), batch_stats("hessian", xb)
    weights = [torch.randn(6, 8) for _ in range(3)]
    shared = get_pruner("sparsegpt", blocksize=4)
    for weight, stats in zip(weights, [a, a_copy, b], strict=True):
        got = shared.prune(weight, stats, 0.5, UNSTRUCTURED)
        fresh = get_pruner("sparsegpt", blocksize=4).prune(weight, stats, 0.5, UNSTRUCTURED)
        assert torch.equal(got.weight, fresh.weight) and torch.equal(got.mask, fresh.mask)
    assert not torch.equal(
        shared.prune(weights[0], a, 0.5, UNSTRUCTURED).weight,
        shared.prune(weights[0], b, 0.5, UNSTRUCTURED).weight,
    )


@pytest.mark.parametrize("name", ["wanda", "sparsegpt"])
def test_bfloat16_weights_get_the_float32_weights_mask(name):
    """bfloat16 weights are scored (and swept) in float32: the mask is the one of the same values in
    float32 (bfloat16 scores would tie far more often), and the weights come back in bfloat16."""
    torch.manual_seed(3)
    weight = torch.randn(16, 32).to(torch.bfloat16)
    stats = batch_stats(get_pruner(name).stat_kind, torch.randn(4, 64, 32))
    low = get_pruner(name).prune(weight, stats, 0.5, parse_pattern("unstructured"))
    high = get_pruner(name).prune(weight.float(), stats, 0.5, parse_pattern("unstructured"))
    assert low.weight.dtype == torch.bfloat16
    assert torch.equal(low.mask, high.mask)
    assert torch.equal(low.weight, high.weight.to(torch.bfloat16))
