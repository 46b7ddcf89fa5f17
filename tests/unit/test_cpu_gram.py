"""fedprune.cpu_gram: bfloat16 Gram sums from AVX512-BF16 dot products, against float64 and against the
instruction's definition emulated in torch."""

from __future__ import annotations

import pytest
import torch

from fedprune import cpu_gram
from fedprune.config import ConfigError, check_kernel_settings
from fedprune.cpu_gram import ENV, gram_backend, gram_upper_add_bf16_, native_gram_available
from fedprune.stat_kinds import gram_mirror_, gram_sum, gram_upper_add_

needs_kernel = pytest.mark.skipif(
    cpu_gram._kernel() is None, reason="no AVX512-BF16 CPU or no C++ compiler: the kernel is unavailable"
)


def emulated_gram(window: torch.Tensor) -> torch.Tensor:
    """vdpbf16ps as Intel defines it, one float32 rounding per addition: for each token pair p in order,
    acc += x[2p+1] x[2p+1]ᵀ, then acc += x[2p] x[2p]ᵀ (bfloat16 products are exact in float32)."""
    tokens, n = window.shape
    x = torch.cat([window, window.new_zeros(tokens % 2, n)]).float()  # (even tokens, in)
    acc = torch.zeros(n, n)
    for p in range(x.shape[0] // 2):
        acc = acc + torch.outer(x[2 * p + 1], x[2 * p + 1])
        acc = acc + torch.outer(x[2 * p], x[2 * p])
    return acc


@needs_kernel
@pytest.mark.parametrize("tokens, n, tile", [(7, 5, 16), (33, 37, 16), (64, 100, 32), (20, 200, 128)])
def test_each_entry_is_the_instructions_float32_sum(monkeypatch, tokens, n, tile):
    """Bit for bit the emulation, per window, summed over windows in float64 in window order: ragged
    token counts and widths, strips of several tiles and column chunks."""
    monkeypatch.delenv(ENV, raising=False)
    torch.manual_seed(tokens)
    x = torch.randn(3, tokens, n).to(torch.bfloat16)  # (windows, tokens, in)
    expected = torch.zeros(n, n, dtype=torch.float64)
    for window in x:
        expected += emulated_gram(window).double()
    got = gram_mirror_(gram_upper_add_bf16_(torch.zeros(n, n, dtype=torch.float64), x, tile, chunk=48), tile)
    assert torch.equal(got, expected)
    assert torch.equal(gram_sum(x, tile=tile), expected)  # the Hessian kind's path takes the kernel


@needs_kernel
def test_close_to_float64_and_independent_of_threads_and_grouping(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    torch.manual_seed(1)
    x = (torch.randn(4, 512, 300) * torch.linspace(0.1, 10, 300)).to(torch.bfloat16)  # (windows, tokens, in)
    reference = sum(window.double().t() @ window.double() for window in x)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gram_sum(x)
        torch.set_num_threads(2)
        two = gram_sum(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert torch.allclose(one, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
    split = gram_upper_add_(gram_upper_add_(torch.zeros(300, 300, dtype=torch.float64), x[:1]), x[1:])
    assert torch.equal(gram_mirror_(split), one)  # windows added one after another, however grouped
    assert gram_sum(x.reshape(2, 2, 512, 300)).equal(one)  # any leading shape


def test_torch_backend_upcasts_bit_for_bit(monkeypatch):
    """FEDPRUNE_GRAM=torch: the float32 product of the upcast windows, exactly."""
    monkeypatch.setenv(ENV, "torch")
    assert not native_gram_available()
    torch.manual_seed(2)
    x = torch.randn(2, 32, 40).to(torch.bfloat16)
    assert torch.equal(gram_sum(x), gram_sum(x.float()))


def test_unavailable_kernel_falls_back_to_torch(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(cpu_gram, "_kernel", lambda: None)
    assert not native_gram_available()
    x = torch.randn(2, 9, 24).to(torch.bfloat16)
    assert torch.equal(gram_sum(x), gram_sum(x.float()))
    with pytest.raises(ValueError, match="needs the kernel"):
        gram_upper_add_bf16_(torch.zeros(24, 24, dtype=torch.float64), x, 16)


@needs_kernel
def test_bad_arguments_are_refused(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    x = torch.randn(1, 8, 24).to(torch.bfloat16)
    with pytest.raises(ValueError, match="multiples of 16"):
        gram_upper_add_bf16_(torch.zeros(24, 24, dtype=torch.float64), x, 20)
    with pytest.raises(ValueError, match="contiguous float64"):
        gram_upper_add_bf16_(torch.zeros(24, 24), x, 16)
    total = torch.zeros(24, 24, dtype=torch.float64).t()
    assert torch.equal(gram_mirror_(gram_upper_add_(total, x)), gram_sum(x.float()))  # not contiguous: torch


def test_unknown_backend_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv(ENV, "mkl")
    with pytest.raises(ValueError, match=ENV):
        gram_backend()
    with pytest.raises(ConfigError, match="FEDPRUNE_GRAM='mkl'"):
        check_kernel_settings()


@needs_kernel
def test_a_forked_child_does_not_inherit_the_thread_pool(monkeypatch):
    """A forked child has none of its parent's threads: the pool is dropped at fork (torch's own
    threads do not survive fork either, so the child sums on one thread), and the child's sums agree."""
    import multiprocessing

    monkeypatch.delenv(ENV, raising=False)
    x = torch.randn(2, 16, 400).to(torch.bfloat16)  # 4 strips: several calls, so the pool is used
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        expected = gram_sum(x)
    finally:
        torch.set_num_threads(threads)
    assert cpu_gram._pool.cache_info().currsize >= 1
    with multiprocessing.get_context("fork").Pool(1) as pool:
        pools, got = pool.apply_async(_gram_in_child, (x,)).get(timeout=60)
    assert pools == 0
    assert torch.equal(got, expected)


def _gram_in_child(x: torch.Tensor) -> tuple[int, torch.Tensor]:
    pools = cpu_gram._pool.cache_info().currsize
    torch.set_num_threads(1)
    return pools, gram_sum(x)


@needs_kernel
def test_bfloat16_block_statistics_take_the_kernel(monkeypatch):
    """A bfloat16 block's Hessian sums come from the kernel (close to the float32 upcast's); with a
    token bound (clipping in float32, for DP) they do not."""
    from fedprune import stat_kinds
    from fedprune.models import find_blocks
    from fedprune.sequential import capture_block_inputs, collect_block_stats
    from tests.tiny_models import random_windows, tiny_model

    monkeypatch.delenv(ENV, raising=False)
    calls = []
    real = stat_kinds.gram_upper_add_bf16_
    monkeypatch.setattr(stat_kinds, "gram_upper_add_bf16_", lambda *a: calls.append(1) or real(*a))
    model = tiny_model("llama").to(torch.bfloat16)
    inputs = capture_block_inputs(model, random_windows(4, 8), batch_size=2)
    block = find_blocks(model)[1][0]
    native = collect_block_stats(block, inputs, "hessian")
    assert len(calls) == 2 * len(native.groups)  # one call per group and micro-batch
    monkeypatch.setenv(ENV, "torch")
    upcast = collect_block_stats(block, inputs, "hessian")
    for got, expected in zip(native.group_stats, upcast.group_stats, strict=True):
        assert got.count == expected.count
        assert torch.allclose(got.total, expected.total, rtol=1e-5, atol=1e-4)
    monkeypatch.delenv(ENV)
    calls.clear()
    collect_block_stats(block, inputs, "hessian", token_bound=100.0)
    assert not calls
