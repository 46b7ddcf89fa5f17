"""Unit scores and the mean compensation on hand-made tensors."""

import torch

from fedprune.stats import Stats
from fedprune.structured.families import Coupling
from fedprune.structured.select import Coupled, get_selector, mean_compensation


def _coupled(consumer, producer=None, bias=None):
    """Units of one column each (FFN-like), the producer's rows matching."""
    units = consumer.shape[1]
    index = torch.arange(units).reshape(units, 1)
    rows = {"up": index} if producer is not None else {}
    weights = {"down": consumer, **({"up": producer} if producer is not None else {})}
    return Coupled(Coupling("ffn", units, rows, {"down": index}), weights, bias)


class _Pruner:
    def __init__(self, name, **params):
        self.name = name
        self.__dict__.update(params)


def test_magnitude_keeps_largest_l2_over_producer_rows_and_consumer_columns():
    down = torch.tensor([[1.0, 0.0, 3.0], [1.0, 0.1, 0.0]])  # column norms^2: 2, 0.01, 9
    up = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 0.0]])  # row norms^2: 0, 16, 0
    # unit totals: 2, 16.01, 9 -> remove unit 0
    choice = get_selector("magnitude")(_Pruner("magnitude"), _coupled(down, up), {}, 1)
    assert choice.kept.tolist() == [1, 2] and choice.consumer_weight is None


def test_wanda_scores_consumer_columns_times_input_rms():
    down = torch.tensor([[1.0, -2.0, 1.0], [1.0, 2.0, -1.0]])  # column |W| sums: 2, 4, 2
    sq = torch.tensor([8.0, 0.5, 32.0])  # over 2 tokens: rms 2, 0.5, 4 -> scores 4, 2, 8
    stats = {"down": Stats("sq_norm", sq.double(), 2)}
    choice = get_selector("wanda")(_Pruner("wanda"), _coupled(down), stats, 2)
    assert choice.kept.tolist() == [2]


def test_variance_ranks_by_output_variance_and_keeps_the_expected_output():
    torch.manual_seed(0)
    x = torch.randn(50, 4).double() * torch.tensor([1.0, 0.1, 2.0, 0.5]) + torch.tensor([3.0, -1.0, 0.0, 2.0])
    down = torch.randn(3, 4).double()
    bias = torch.randn(3).double()
    stats = {"down": Stats("moments", torch.stack([x.sum(0), x.pow(2).sum(0)]), 50)}
    var = x.var(0, unbiased=False)
    expected_scores = var * down.pow(2).sum(0)
    order = torch.argsort(expected_scores)
    choice = get_selector("variance")(
        _Pruner("variance", weight_norm=True), _coupled(down, bias=bias), stats, 2
    )
    assert choice.kept.tolist() == sorted(order[2:].tolist())
    kept = choice.kept
    dense_mean = (x @ down.T + bias).mean(0)
    pruned_mean = (x[:, kept] @ down[:, kept].T + choice.consumer_bias).mean(0)
    torch.testing.assert_close(pruned_mean, dense_mean)
    plain = get_selector("variance")(
        _Pruner("variance", weight_norm=False), _coupled(down, bias=bias), stats, 2
    )
    assert plain.kept.tolist() == sorted(torch.argsort(var)[2:].tolist())


def test_mean_compensation_without_a_bias_starts_from_zero():
    weight = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    bias = mean_compensation(weight, None, torch.tensor([10.0, 100.0]).double(), torch.tensor([1]))
    assert bias.tolist() == [200.0, 400.0]


def test_ties_remove_the_lower_unit_first():
    down = torch.ones(2, 4)
    choice = get_selector("magnitude")(_Pruner("magnitude"), _coupled(down), {}, 2)
    assert choice.kept.tolist() == [2, 3]


def _affine_stats(x):
    """Σ[x;1][x;1]ᵀ of token inputs ``(tokens, in)`` as the consumer's statistics."""
    from fedprune.stat_kinds import AFFINE_HESSIAN

    return {"down": Stats("affine_hessian", AFFINE_HESSIAN.compute(x), x.shape[0])}


def test_affine_hessian_holds_the_gram_the_sums_and_the_count():
    from fedprune.stat_kinds import AFFINE_HESSIAN

    x = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]])  # (windows, tokens, in)
    total = AFFINE_HESSIAN.compute(x)
    assert total.tolist() == [[10.0, -1.0, 4.0], [-1.0, 5.0, 1.0], [4.0, 1.0, 2.0]]
    wire = AFFINE_HESSIAN.to_wire(total)
    assert wire.shape == (AFFINE_HESSIAN.wire_length(2),) == (6,)
    assert torch.equal(AFFINE_HESSIAN.from_wire(wire, 2), total)


def test_obs_refits_weights_and_bias_by_affine_least_squares():
    """With no damping the kept columns and the bias are the least-squares fit of the dense output with
    an intercept (solved directly), whichever units are kept."""
    torch.manual_seed(1)
    x = torch.randn(400, 6).double() @ torch.randn(6, 6).double() + torch.tensor(
        [1.0, -2.0, 0.5, 3.0, 0.0, 1.0]
    )
    down, bias = torch.randn(4, 6).double(), torch.randn(4).double()
    target = x @ down.T + bias  # (tokens, out)
    for select in ("obs", "variance"):
        pruner = _Pruner("obs", percdamp=0.0, select=select)
        choice = get_selector("obs")(pruner, _coupled(down, bias=bias), _affine_stats(x), 3)
        kept = choice.kept
        design = torch.cat([x[:, kept], torch.ones(400, 1, dtype=torch.float64)], dim=1)
        solution = torch.linalg.lstsq(design, target).solution  # (kept + 1, out)
        torch.testing.assert_close(choice.consumer_weight[:, kept], solution[:-1].T)
        torch.testing.assert_close(choice.consumer_bias, solution[-1])
        removed = [i for i in range(6) if i not in kept.tolist()]
        assert (choice.consumer_weight[:, removed] == 0).all()


def test_obs_variance_selection_keeps_the_units_of_most_output_variance():
    torch.manual_seed(2)
    x = torch.randn(300, 5).double() * torch.tensor([1.0, 0.1, 3.0, 0.5, 2.0])
    down = torch.ones(2, 5).double()
    choice = get_selector("obs")(
        _Pruner("obs", percdamp=0.1, select="variance"), _coupled(down), _affine_stats(x), 2
    )
    assert choice.kept.tolist() == [0, 2, 4]
