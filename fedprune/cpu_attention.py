"""Causal self-attention by query chunks during the calibration block passes on CPU.

torch's CPU flash-attention kernel splits the keys into blocks of up to 512; a causal window of at most
512 tokens is then one key block, and the kernel computes every query-key product, the masked half
included. Calling ``scaled_dot_product_attention`` once per chunk of 32 queries, on the keys up to the
chunk's last query only, skips most of that half. On SmolLM2's 512-token windows (9 heads, 3 key/value
heads, head dim 64, micro-batch 4, one thread) a pass over its 30 blocks takes about 0.95x the CPU time
(``python experiments/probes/block_pass_ab.py attention``; attention is about a seventh of a pass).
Every query still attends to exactly the keys it did, through the same kernel; the sums are split
differently, so outputs move at float32 rounding level.

:func:`chunked_causal_attention` turns it on for a module's attention layers for the duration of a block
pass: their config's ``_attn_implementation`` ``"sdpa"`` becomes :data:`IMPLEMENTATION`, registered in
transformers' ``AttentionInterface``. Calls it does not serve exactly (a mask, dropout, a position bias,
soft-capping, sinks, a sliding window, another device, fewer than ``2 * CHUNK`` or more than
:data:`MAX_TOKENS` tokens) go to transformers' own ``sdpa`` function unchanged.

``FEDPRUNE_ATTENTION=torch`` turns it off (``chunked``, the default, keeps it on): for A/B benchmarks.
Within one setting runs are deterministic, and federated and centralized runs still agree exactly.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

ENV = "FEDPRUNE_ATTENTION"
BACKENDS = ("chunked", "torch")
IMPLEMENTATION = "fedprune_chunked_sdpa"
CHUNK = 32  # queries per kernel call
MAX_TOKENS = 512  # torch's CPU kernel uses one key block up to here; beyond, it skips masked blocks itself
_UNSERVED = ("softcap", "sliding_window", "s_aux", "sinks", "position_bias")


def attention_backend() -> str:
    """The setting of ``FEDPRUNE_ATTENTION`` (default ``chunked``); an unknown value is an error."""
    value = os.environ.get(ENV, "chunked").strip().lower() or "chunked"
    if value not in BACKENDS:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(BACKENDS)}")
    return value


def causal_attention_in_chunks(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None, chunk: int = CHUNK
) -> torch.Tensor:
    """Causal attention of ``query`` ``(batch, heads, tokens, dim)`` on ``key``/``value`` ``(batch, kv_heads,
    tokens, dim)`` (``heads`` a multiple of ``kv_heads``), one chunk of ``chunk`` queries at a time on the
    keys up to the chunk's last query: ``(batch, heads, tokens, dim)``."""
    tokens = query.shape[2]
    if key.shape[2] != tokens or value.shape[2] != tokens:
        raise ValueError(f"self-attention needs as many keys as queries, got {tuple(key.shape)} for {tokens}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    gqa = query.shape[1] != key.shape[1]
    out = query.new_empty(*query.shape[:3], value.shape[-1])  # (batch, heads, tokens, dim_v)
    for start in range(0, tokens, chunk):
        end = min(start + chunk, tokens)
        # query start + r may see keys 0 .. start + r
        allowed = torch.ones(end - start, end, dtype=torch.bool, device=query.device).tril(diagonal=start)
        out[:, :, start:end] = F.scaled_dot_product_attention(
            query[:, :, start:end],
            key[:, :, :end],
            value[:, :, :end],
            attn_mask=allowed,
            scale=scale,
            enable_gqa=gqa,
        )
    return out


def _served(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, mask, dropout, is_causal, kwargs
) -> bool:
    """Whether a call is plain causal self-attention on CPU that :func:`causal_attention_in_chunks` computes."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return (
        causal is True
        and mask is None
        and dropout == 0.0
        and not kwargs.get("output_attentions", False)
        and all(kwargs.get(name) is None for name in _UNSERVED)
        and query.device.type == "cpu"
        and query.dim() == 4
        and 2 * CHUNK <= query.shape[2] == key.shape[2] <= MAX_TOKENS
        and query.shape[1] % key.shape[1] == 0
    )


def chunked_sdpa_forward(
    module: nn.Module,
    query: torch.Tensor,  # (batch, heads, tokens, dim)
    key: torch.Tensor,  # (batch, kv_heads, tokens, dim)
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """An attention function with transformers' ``sdpa`` signature: causal self-attention by chunks where
    served, else transformers' ``sdpa_attention_forward``. Returns ``((batch, tokens, heads, dim), None)``."""
    if not _served(module, query, key, attention_mask, dropout, is_causal, kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    out = causal_attention_in_chunks(query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _registered() -> bool:
    """Register :func:`chunked_sdpa_forward` with transformers once; False if this transformers has no
    attention registry."""
    try:
        from transformers import AttentionInterface
    except ImportError as error:
        logger.info("no transformers AttentionInterface (%s): attention is not chunked", error)
        return False
    AttentionInterface.register(IMPLEMENTATION, chunked_sdpa_forward)
    return True


@contextmanager
def chunked_causal_attention(module: nn.Module) -> Iterator[int]:
    """Within the context, the ``sdpa`` attention layers of ``module`` compute causal self-attention by
    query chunks (unless turned off); yields how many configs were switched. On exit they are back."""
    if attention_backend() != "chunked" or not _registered():
        yield 0
        return
    configs = {}
    for sub in module.modules():
        config = getattr(sub, "config", None)
        if config is not None and getattr(config, "_attn_implementation", None) == "sdpa":
            configs[id(config)] = config
    for config in configs.values():
        config._attn_implementation_internal = IMPLEMENTATION  # this config only, not its sub-configs
    try:
        yield len(configs)
    finally:
        for config in configs.values():
            config._attn_implementation_internal = "sdpa"
