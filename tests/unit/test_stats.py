import pytest
import torch

from fedprune.stats import add_stats, batch_stats, empty_stats, gram_sum, sq_norm_sum, sum_stats


def test_sq_norm_hand_checked():
    x = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]])  # (1 window, 2 tokens, 2 features)
    assert sq_norm_sum(x).tolist() == [10.0, 5.0]
    assert batch_stats("sq_norm", x).count == 2


def test_gram_hand_checked():
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])  # (tokens, in)
    # [1,2]ᵀ[1,2] + [3,-1]ᵀ[3,-1] = [[1,2],[2,4]] + [[9,-3],[-3,1]]
    assert gram_sum(x).tolist() == [[10.0, -1.0], [-1.0, 5.0]]
    assert gram_sum(x).dtype == torch.float64


@pytest.mark.parametrize("kind", ["sq_norm", "hessian"])
def test_statistics_are_additive(kind):
    torch.manual_seed(0)
    a = torch.randn(3, 7, 5)
    b = torch.randn(2, 7, 5)
    pooled = batch_stats(kind, torch.cat([a, b]))
    summed = add_stats(batch_stats(kind, a), batch_stats(kind, b))
    assert summed.count == pooled.count == 35
    assert torch.allclose(summed.total, pooled.total, rtol=1e-12, atol=1e-12)


def test_empty_is_neutral_and_mean():
    x = torch.randn(2, 3, 4)
    s = batch_stats("hessian", x)
    total = sum_stats([empty_stats("hessian", 4), s])
    assert torch.equal(total.total, s.total) and total.count == 6
    assert torch.allclose(s.mean(), s.total / 6)


def test_mismatched_stats_rejected():
    with pytest.raises(ValueError):
        add_stats(empty_stats("sq_norm", 3), empty_stats("hessian", 3))
    with pytest.raises(ValueError):
        empty_stats("sq_norm", 3).mean()
    with pytest.raises(KeyError):
        batch_stats("nope", torch.ones(2, 2))


def test_tiled_gram_equals_full_product():
    torch.manual_seed(0)
    x = torch.randn(3, 9, 11, dtype=torch.float64)
    full = sum(w.t() @ w for w in x)
    for tile in (1, 4, 11, 64):
        assert torch.allclose(gram_sum(x, tile=tile), full, rtol=1e-12, atol=1e-12)


def test_gram_is_the_per_window_float32_product_summed_in_float64():
    """Bit for bit: each window's float32 product (one plain matmul), summed in float64 — whatever the
    strip width, so batches and sites that group windows differently get the same sums."""
    torch.manual_seed(1)
    x = torch.randn(3, 64, 300)  # (windows, tokens, in), float32
    reference = torch.zeros(300, 300, dtype=torch.float64)
    for window in x:
        reference += (window.t() @ window).double()
    for tile in (256, 128, 300, 512):
        assert torch.equal(gram_sum(x, tile=tile), reference), tile
    assert torch.equal(gram_sum(x[:1]) + gram_sum(x[1:]), reference)


def test_bfloat16_inputs_are_summed_as_exactly_as_float32():
    """bfloat16 activations: products and sums in float32/64. The squared norms equal those of the upcast
    input; the Gram sums too, to float32 rounding (bit for bit with ``FEDPRUNE_GRAM=torch``: the kernel's
    own order is tested in tests/unit/test_cpu_gram.py)."""
    torch.manual_seed(2)
    x = torch.randn(2, 32, 40).to(torch.bfloat16)
    upcast = gram_sum(x.float())
    assert torch.allclose(gram_sum(x), upcast, rtol=1e-6, atol=1e-5)
    assert torch.equal(sq_norm_sum(x), sq_norm_sum(x.float()))
    assert gram_sum(x).dtype == sq_norm_sum(x).dtype == torch.float64
