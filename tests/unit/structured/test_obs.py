"""Structured OBS group removal against direct least-squares and brute-force references."""

from itertools import combinations

import pytest
import torch

from fedprune.structured import obs
from fedprune.structured.obs import GroupRemoval, damped_gram, group_scores, remove_groups


def _problem(out: int, n: int, seed: int, dead: int | None = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (out, n) float64 weight and PSD Gram XᵀX (n, n), input ``dead`` never active."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, n, dtype=torch.float64, generator=g)  # (tokens, n)
    x = x @ torch.randn(n, n, dtype=torch.float64, generator=g)  # correlated inputs
    if dead is not None:
        x[:, dead] = 0.0
    w = torch.randn(out, n, dtype=torch.float64, generator=g)
    return w, x.T @ x


def _ls_optimum(w: torch.Tensor, hd: torch.Tensor, kept_cols: torch.Tensor) -> torch.Tensor:
    """argmin over V with V[:, ¬K] = 0 of tr((W - V) Hd (W - V)ᵀ): V_K = W Hd[:, K] Hd[K, K]⁻¹, (out, n)."""
    v = torch.zeros_like(w)
    h_kk = hd[kept_cols][:, kept_cols]
    v[:, kept_cols] = torch.linalg.solve(h_kk, (w @ hd[:, kept_cols]).T).T  # Hd symmetric
    return v


def _error(w: torch.Tensor, v: torch.Tensor, hd: torch.Tensor) -> float:
    d = w - v  # (out, n)
    return float(torch.trace(d @ hd @ d.T))


def _kept_columns(n: int, groups: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[groups[removed].reshape(-1)] = False
    return keep.nonzero().squeeze(1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(params=[128, 2], ids=["block128", "block2"])
def block_rank(request, monkeypatch):
    """Run with the default lazy block and with explicit updates (and compaction) every step or two."""
    monkeypatch.setattr(obs, "_BLOCK_RANK", request.param)
    return request.param


@pytest.mark.parametrize(
    ("n", "size", "num_remove", "chunk"),
    [(10, 1, 6, 1), (10, 1, 6, 3), (12, 3, 2, 1), (12, 3, 3, 2)],
)
def test_kept_columns_are_least_squares_optimum(block_rank, n, size, num_remove, chunk):
    w, gram = _problem(7, n, seed=n + size + chunk)
    groups = torch.arange(n).reshape(-1, size)
    res = remove_groups(w, gram, groups, num_remove, chunk=chunk)
    hd = damped_gram(gram, 0.01)
    kept_cols = _kept_columns(n, groups, res.removed)
    expected = _ls_optimum(w, hd, kept_cols)
    assert _rel(res.weight[:, kept_cols], expected[:, kept_cols]) < 1e-8
    assert torch.all(res.weight[:, groups[res.removed].reshape(-1)] == 0)
    assert res.weight.dtype == w.dtype and res.weight.shape == w.shape
    # kept sorted, removed distinct, together all groups
    assert res.kept.dtype == torch.int64 and res.removed.dtype == torch.int64
    assert torch.equal(res.kept, torch.sort(res.kept).values)
    assert sorted(res.kept.tolist() + res.removed.tolist()) == list(range(groups.shape[0]))


def test_ungrouped_columns_stay_and_are_updated(block_rank):
    n = 11
    w, gram = _problem(5, n, seed=3, dead=9)
    groups = torch.tensor([[0, 4, 8], [1, 5, 6], [2, 3, 7]])  # columns 9 (dead) and 10 are ungrouped
    res = remove_groups(w, gram, groups, 2)
    hd = damped_gram(gram, 0.01)
    kept_cols = _kept_columns(n, groups, res.removed)
    assert {9, 10} <= set(kept_cols.tolist())
    assert _rel(res.weight[:, kept_cols], _ls_optimum(w, hd, kept_cols)[:, kept_cols]) < 1e-8
    assert abs(res.error - _error(w, res.weight, hd)) < 1e-8 * _error(w, res.weight, hd)


@pytest.mark.parametrize(("n", "size"), [(9, 1), (12, 3)])
def test_first_choice_and_scores_match_brute_force(n, size):
    w, gram = _problem(6, n, seed=10 + size)
    groups = torch.arange(n).reshape(-1, size)
    hd = damped_gram(gram, 0.01)
    true_errors = []
    for g in range(groups.shape[0]):
        kept_cols = _kept_columns(n, groups, torch.tensor([g]))
        true_errors.append(_error(w, _ls_optimum(w, hd, kept_cols), hd))
    true_errors = torch.tensor(true_errors, dtype=torch.float64)
    scores = group_scores(w, torch.linalg.inv(hd), groups)
    assert scores.shape == (groups.shape[0],)
    assert _rel(scores, true_errors) < 1e-9
    res = remove_groups(w, gram, groups, 1)
    assert int(res.removed[0]) == int(torch.argmin(true_errors))
    assert res.error == pytest.approx(float(true_errors.min()), rel=1e-9)


@pytest.mark.parametrize(("n", "size", "num_remove", "chunk"), [(10, 1, 7, 1), (10, 1, 7, 2), (12, 2, 4, 1)])
def test_error_equals_direct_error_of_final_weight(block_rank, n, size, num_remove, chunk):
    w, gram = _problem(8, n, seed=20 + n + size)
    groups = torch.arange(n).reshape(-1, size)
    res = remove_groups(w, gram, groups, num_remove, chunk=chunk)
    direct = _error(w, res.weight, damped_gram(gram, 0.01))
    assert res.error == pytest.approx(direct, rel=1e-9)
    assert res.error > 0


def test_scale_invariance():
    # no dead input: a dead input's diagonal 1 (the sparsegpt convention) does not scale with the Gram
    n = 12
    w, gram = _problem(6, n, seed=4, dead=None)
    groups = torch.arange(n).reshape(-1, 2)
    a = remove_groups(w, gram, groups, 3)
    b = remove_groups(w, gram * 7.3, groups, 3)
    assert torch.equal(a.kept, b.kept) and torch.equal(a.removed, b.removed)
    assert _rel(b.weight, a.weight) < 1e-10
    assert b.error == pytest.approx(7.3 * a.error, rel=1e-9)


def test_float32_weight_and_no_argument_mutation():
    n = 10
    w64, gram = _problem(4, n, seed=5)
    w = w64.to(torch.float32)
    groups = torch.arange(n).reshape(-1, 1)
    w_copy, gram_copy, groups_copy = w.clone(), gram.clone(), groups.clone()
    res = remove_groups(w, gram, groups, 4)
    assert isinstance(res, GroupRemoval)
    assert res.weight.dtype == torch.float32
    assert torch.all(res.weight[:, res.removed] == 0)
    assert torch.equal(w, w_copy) and torch.equal(gram, gram_copy) and torch.equal(groups, groups_copy)
    d = damped_gram(gram, 0.01)
    assert d.dtype == torch.float64 and torch.equal(gram, gram_copy)
    assert float(d[1, 1]) == pytest.approx(
        1.0 + 0.01 * float(torch.diagonal(gram).sum() + 1.0) / n, rel=1e-12
    )


def test_remove_none():
    w, gram = _problem(3, 6, seed=6)
    groups = torch.arange(6).reshape(-1, 2)
    res = remove_groups(w, gram, groups, 0)
    assert res.removed.numel() == 0 and torch.equal(res.kept, torch.arange(3))
    assert torch.equal(res.weight, w) and res.error == 0.0


@pytest.mark.parametrize(
    ("groups", "num_remove", "match"),
    [
        (torch.tensor([[0], [1], [6]]), 1, "range"),
        (torch.tensor([[0], [-1], [2]]), 1, "range"),
        (torch.tensor([[0, 1], [1, 2]]), 1, "disjoint"),
        (torch.tensor([[0], [1], [2]]), 3, "num_remove"),
        (torch.tensor([[0], [1], [2]]), -1, "num_remove"),
        (torch.tensor([[0.0], [1.0]]), 1, "integer"),
        (torch.tensor([0, 1, 2]), 1, "groups must be"),
    ],
)
def test_validation(groups, num_remove, match):
    w, gram = _problem(3, 6, seed=7)
    with pytest.raises(ValueError, match=match):
        remove_groups(w, gram, groups, num_remove)


def test_validation_shapes_and_options():
    w, gram = _problem(3, 6, seed=8)
    groups = torch.arange(6).reshape(-1, 1)
    with pytest.raises(ValueError, match="gram"):
        remove_groups(w, gram[:5, :5], groups, 1)
    with pytest.raises(ValueError, match="chunk"):
        remove_groups(w, gram, groups, 1, chunk=0)
    with pytest.raises(ValueError, match="percdamp"):
        remove_groups(w, gram, groups, 1, percdamp=-0.1)


def test_greedy_is_no_better_than_best_subset():
    n = 5
    w, gram = _problem(4, n, seed=9, dead=None)
    groups = torch.arange(n).reshape(-1, 1)
    hd = damped_gram(gram, 0.01)
    subset_errors = {}
    for removed in combinations(range(n), 2):
        kept_cols = _kept_columns(n, groups, torch.tensor(removed))
        subset_errors[removed] = _error(w, _ls_optimum(w, hd, kept_cols), hd)
    res = remove_groups(w, gram, groups, 2)
    assert res.kept.numel() == 3 and len(set(res.kept.tolist()) | set(res.removed.tolist())) == n
    greedy = tuple(sorted(res.removed.tolist()))
    assert res.error == pytest.approx(subset_errors[greedy], rel=1e-9)
    assert res.error >= min(subset_errors.values()) * (1 - 1e-12)


@pytest.mark.parametrize(("n", "size", "num_remove", "chunk"), [(10, 1, 7, 1), (12, 2, 4, 1), (12, 1, 8, 3)])
def test_removal_order_matches_brute_force_greedy(block_rank, n, size, num_remove, chunk):
    """Each step's picks are the lowest true added errors given the groups already removed."""
    w, gram = _problem(5, n, seed=30 + n + size + chunk)
    groups = torch.arange(n).reshape(-1, size)
    hd = damped_gram(gram, 0.01)
    removed: list[int] = []
    while len(removed) < num_remove:
        current = _ls_optimum(w, hd, _kept_columns(n, groups, torch.tensor(removed, dtype=torch.int64)))
        base = _error(w, current, hd)
        added = {
            g: _error(w, _ls_optimum(w, hd, _kept_columns(n, groups, torch.tensor(removed + [g]))), hd) - base
            for g in range(groups.shape[0])
            if g not in removed
        }
        removed += sorted(added, key=added.get)[: min(chunk, num_remove - len(removed))]
    res = remove_groups(w, gram, groups, num_remove, chunk=chunk)
    assert res.removed.tolist() == removed


def test_large_groups_with_two_threads():
    """Regression: batched torch.linalg.solve of (3, 192, 192) blocks fails on CPU with 2 threads (MKL
    DLASWP error, torch 2.13); SmolLM2's key/value groups are that size."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(800, 576, dtype=torch.float64, generator=gen)
        weight = torch.randn(64, 576, dtype=torch.float64, generator=gen)
        result = remove_groups(weight, x.T @ x, torch.arange(576).reshape(3, 192), 1)
    finally:
        torch.set_num_threads(old)
    assert result.kept.numel() == 2 and torch.isfinite(result.weight).all()
