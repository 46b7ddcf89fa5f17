"""fedprune.cpu_linear: oneDNN float32 linears in the block passes, against a float64 product."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedprune.config import ConfigError, check_kernel_settings
from fedprune.cpu_linear import ENV, linear_backend, onednn_available, onednn_linears
from fedprune.sequential import capture_block_inputs, run_block
from tests.tiny_models import random_windows, tiny_model

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="no oneDNN float32 linear on this CPU")


class Tagged(nn.Linear):
    """A subclass of nn.Linear: not a plain layer, so never switched."""


def two_layers() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 16, bias=False), Tagged(16, 8))


def reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The same network in float64: an independent product."""
    h = x.double() @ model[0].weight.double().t() + model[0].bias.double()
    h = torch.nn.functional.gelu(h) @ model[2].weight.double().t()
    return h @ model[3].weight.double().t() + model[3].bias.double()


@needs_onednn
def test_switches_plain_linears_and_matches_a_float64_product(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    model = two_layers()
    x = torch.randn(3, 7, 24)  # (windows, tokens, in)
    with torch.no_grad(), onednn_linears(model) as switched:
        assert switched == 2  # the two plain nn.Linear, not the subclass
        assert "forward" in model[0].__dict__ and "forward" not in model[3].__dict__
        got = model(x)
    assert all("forward" not in layer.__dict__ for layer in model)  # restored
    torch.testing.assert_close(got.double(), reference(model, x), rtol=1e-5, atol=1e-5)


def test_torch_backend_switches_nothing(monkeypatch):
    monkeypatch.setenv(ENV, "torch")
    model = two_layers()
    x = torch.randn(5, 24)
    with torch.no_grad():
        plain = model(x)
        with onednn_linears(model) as switched:
            assert switched == 0
            assert torch.equal(model(x), plain)


def test_unknown_backend_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv(ENV, "mkl")
    with pytest.raises(ValueError, match=ENV):
        linear_backend()
    with pytest.raises(ConfigError, match="FEDPRUNE_LINEAR='mkl'"):
        check_kernel_settings()


@needs_onednn
def test_other_dtypes_and_gradients_fall_back_to_f_linear(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    model = two_layers()
    x = torch.randn(4, 24, requires_grad=True)
    with onednn_linears(model):
        out = model(x)  # autograd on: F.linear, so gradients flow
        out.sum().backward()
        bf16 = model.to(torch.bfloat16)
        xb = x.detach().bfloat16()
        with torch.no_grad():
            got_bf16 = bf16(xb)
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(got_bf16, bf16(xb))  # the bfloat16 call was F.linear's, bit for bit


@needs_onednn
def test_restored_after_an_error_and_hooks_still_run(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    model = two_layers()
    seen: list[tuple[int, ...]] = []
    model[2].register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
    with pytest.raises(RuntimeError, match="stop"), torch.no_grad(), onednn_linears(model):
        model(torch.randn(2, 24))
        raise RuntimeError("stop")
    assert seen == [(2, 40)]
    assert all("forward" not in layer.__dict__ for layer in model)


@needs_onednn
def test_block_pass_matches_the_torch_backend_to_float32_rounding(monkeypatch):
    """run_block with oneDNN and with MKL agree to float32 rounding on a tiny Llama."""
    model = tiny_model("llama", seed=3)
    ids = random_windows(4, 12, seed=1)
    inputs = capture_block_inputs(model, ids, 2)
    block = model.model.layers[0]
    outputs = {}
    for backend in ("torch", "onednn"):
        monkeypatch.setenv(ENV, backend)
        outputs[backend] = torch.cat(run_block(block, inputs).hidden)
    torch.testing.assert_close(outputs["onednn"], outputs["torch"], rtol=1e-5, atol=1e-5)
    assert not any("forward" in m.__dict__ for m in block.modules())
