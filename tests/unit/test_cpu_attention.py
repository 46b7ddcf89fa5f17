"""fedprune.cpu_attention: causal attention by query chunks, against a float64 softmax and transformers."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from fedprune import cpu_attention
from fedprune.config import ConfigError, check_kernel_settings
from fedprune.cpu_attention import (
    ENV,
    IMPLEMENTATION,
    attention_backend,
    causal_attention_in_chunks,
    chunked_causal_attention,
    chunked_sdpa_forward,
)
from fedprune.sequential import capture_block_inputs, run_block
from tests.tiny_models import random_windows, tiny_model


def reference(query, key, value, scale):
    """Causal softmax attention in float64, key/value heads repeated: an independent computation."""
    groups = query.shape[1] // key.shape[1]
    k = key.double().repeat_interleave(groups, dim=1)
    v = value.double().repeat_interleave(groups, dim=1)
    scores = query.double() @ k.transpose(-1, -2) * scale  # (batch, heads, tokens, tokens)
    tokens = query.shape[2]
    future = torch.ones(tokens, tokens, dtype=torch.bool).triu(diagonal=1)
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v


def qkv(batch=2, heads=6, kv_heads=2, tokens=75, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, heads, tokens, dim, generator=g),
        torch.randn(batch, kv_heads, tokens, dim, generator=g),
        torch.randn(batch, kv_heads, tokens, dim, generator=g),
    )


@pytest.mark.parametrize(("tokens", "chunk", "kv_heads"), [(75, 32, 2), (64, 32, 6), (9, 4, 3), (5, 16, 1)])
def test_chunks_give_causal_softmax_attention(tokens, chunk, kv_heads):
    query, key, value = qkv(tokens=tokens, kv_heads=kv_heads)
    got = causal_attention_in_chunks(query, key, value, 0.25, chunk=chunk)
    torch.testing.assert_close(got.double(), reference(query, key, value, 0.25), rtol=1e-5, atol=1e-5)


def test_chunks_refuse_cross_attention_and_a_bad_chunk():
    query, key, value = qkv(tokens=8)
    with pytest.raises(ValueError, match="as many keys as queries"):
        causal_attention_in_chunks(query, key[:, :, :6], value[:, :, :6], None)
    with pytest.raises(ValueError, match="chunk"):
        causal_attention_in_chunks(query, key, value, None, chunk=0)


@pytest.fixture
def chunk_calls(monkeypatch) -> list[int]:
    """Records each call of ``causal_attention_in_chunks`` from within the module."""
    calls: list[int] = []
    served = cpu_attention.causal_attention_in_chunks
    monkeypatch.setattr(cpu_attention, "causal_attention_in_chunks", lambda *a: calls.append(1) or served(*a))
    return calls


class Attention(torch.nn.Module):
    """What transformers' attention functions read from the calling layer."""

    is_causal = True
    num_key_value_groups = 3


def test_served_call_returns_transformers_layout_and_values(chunk_calls):
    query, key, value = qkv(tokens=70)
    out, weights = chunked_sdpa_forward(Attention(), query, key, value, None, scaling=0.25)
    expected, _ = sdpa_attention_forward(Attention(), query, key, value, None, scaling=0.25)
    assert weights is None and out.shape == expected.shape == (2, 70, 6, 16)  # (batch, tokens, heads, dim)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert chunk_calls == [1]
    torch.testing.assert_close(
        out.transpose(1, 2).double(), reference(query, key, value, 0.25), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "call",
    [
        dict(attention_mask=torch.ones(70, 70, dtype=torch.bool).tril()),
        dict(is_causal=False),
        dict(dropout=0.1),
        dict(sliding_window=16),
        dict(tokens=40),  # fewer than two chunks
        dict(tokens=520),  # torch's kernel skips masked key blocks itself
    ],
)
def test_other_calls_go_to_transformers_sdpa_unchanged(call, chunk_calls):
    call = dict(call)
    query, key, value = qkv(tokens=call.pop("tokens", 70))
    mask = call.pop("attention_mask", None)
    torch.manual_seed(1)  # dropout draws
    got, _ = chunked_sdpa_forward(Attention(), query, key, value, mask, scaling=0.25, **call)
    torch.manual_seed(1)
    expected, _ = sdpa_attention_forward(Attention(), query, key, value, mask, scaling=0.25, **call)
    assert torch.equal(got, expected) and chunk_calls == []


def test_block_pass_uses_chunks_and_restores_the_config(monkeypatch, chunk_calls):
    """run_block on a tiny Llama with 80-token windows: the chunked function runs, the outputs equal the
    plain sdpa pass to float32 rounding, and the config says ``sdpa`` again afterwards."""
    monkeypatch.delenv(ENV, raising=False)
    model = tiny_model("llama", seed=3)
    assert model.config._attn_implementation == "sdpa"
    inputs = capture_block_inputs(model, random_windows(3, 80, seed=1), 2)
    block = model.model.layers[0]
    chunked = torch.cat(run_block(block, inputs).hidden)
    assert len(chunk_calls) == 2  # one per micro-batch
    assert model.config._attn_implementation == "sdpa"
    monkeypatch.setenv(ENV, "torch")
    plain = torch.cat(run_block(block, inputs).hidden)
    assert len(chunk_calls) == 2
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)


def test_context_switches_sdpa_configs_and_restores_them_after_an_error(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="stop"), chunked_causal_attention(model) as switched:
        assert switched == 1  # the one config every layer shares
        assert model.config._attn_implementation == IMPLEMENTATION
        raise RuntimeError("stop")
    assert model.config._attn_implementation == "sdpa"
    model.config._attn_implementation = "eager"
    with chunked_causal_attention(model) as switched:
        assert switched == 0 and model.config._attn_implementation == "eager"


def test_torch_setting_switches_nothing_and_a_bad_one_is_refused(monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setenv(ENV, "torch")
    with chunked_causal_attention(model) as switched:
        assert switched == 0 and model.config._attn_implementation == "sdpa"
    monkeypatch.setenv(ENV, "flash")
    with pytest.raises(ValueError, match=ENV):
        attention_backend()
    with pytest.raises(ConfigError, match="FEDPRUNE_ATTENTION='flash'"):
        check_kernel_settings()
