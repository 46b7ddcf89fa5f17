"""Depth pruning: whole decoder blocks and attention sublayers removed.

Which ones, from one pass of the dense model over the calibration windows (each block on the inputs the
dense model gives it): per block, the summed *influence* Σ_t (1 − cos(x_t, y_t)) of the block (x its input,
y its output; ShortGPT's block influence) and of its attention sublayer (y = x + the attention's output).
The blocks and sublayers that change the residual stream least are removed. Both are sums over tokens
with a count (non-negative), so sites can add theirs exactly. ``pruner=gatenorm`` ranks attention
sublayers from the weights alone instead (:func:`gatenorm_scores`).

A removed attention sublayer becomes :class:`ZeroAttention` (its block adds nothing to the residual
there); removed blocks are deleted from the model (:func:`remove_blocks_`), which renumbers the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedprune.cpu_attention import chunked_causal_attention
from fedprune.cpu_linear import onednn_linears
from fedprune.models import find_blocks, get_weight
from fedprune.stats import Stats
from fedprune.structured.families import Family, Geometry

logger = logging.getLogger(__name__)

INFLUENCE = "sq_norm"  # the wire kind of influence sums: a non-negative vector, one entry per block
INFLUENCE_BLOCKS, INFLUENCE_ATTENTION = "influence.blocks", "influence.attention"  # their names on the wire


class ZeroAttention(nn.Module):
    """An attention sublayer that was removed: it contributes zeros to the residual stream.

    With a KV cache it still records one width-1 key per token (zeros), so that the cache's sequence
    length (read from any layer, often the first) stays right during generation.
    """

    def __init__(self, layer_idx: int | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx

    def forward(
        self, hidden_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, None]:
        cache = kwargs.get("cache") or kwargs.get("past_key_values") or kwargs.get("layer_past")
        cache = getattr(cache, "self_attention_cache", cache)
        if cache is not None and hasattr(cache, "update") and self.layer_idx is not None:
            batch, tokens = hidden_states.shape[:2]
            empty = hidden_states.new_zeros(batch, 1, tokens, 1)  # (batch, heads, tokens, head_dim)
            cache.update(empty, empty, self.layer_idx)
        return torch.zeros_like(hidden_states), None


@dataclass(frozen=True)
class Influence:
    """Summed influence per block (``blocks``) and per attention sublayer (``attention``), ``(n,)`` each,
    over ``blocks.count`` tokens."""

    blocks: Stats
    attention: Stats


def cosine_distance_sum(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ over tokens of 1 − cos(x_t, y_t), ``(..., tokens, hidden)`` -> float64 scalar (float32 products)."""
    x32, y32 = x.float().reshape(-1, x.shape[-1]), y.float().reshape(-1, y.shape[-1])
    cos = nn.functional.cosine_similarity(x32, y32, dim=-1, eps=1e-8)  # (tokens,)
    return (1.0 - cos).double().sum().cpu()


def influence_stats(
    block_sums: Sequence[torch.Tensor], attention_sums: Sequence[torch.Tensor], tokens: int
) -> Influence:
    """Influence sums per block as two :class:`Stats` vectors."""
    return Influence(
        Stats(INFLUENCE, torch.stack(list(block_sums)).double(), tokens),
        Stats(INFLUENCE, torch.stack(list(attention_sums)).double(), tokens),
    )


def _output(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple | list) else output


def block_influence(block: nn.Module, family: Family, hidden: Sequence[torch.Tensor], kwargs: Sequence[dict]):
    """One dense block on its inputs: (its influence sum, its attention's influence sum, its outputs)."""
    attention = block.get_submodule(family.attention)
    captured: list[torch.Tensor] = []
    handle = attention.register_forward_hook(lambda _m, _a, out: captured.append(_output(out)))
    block_sum = torch.zeros((), dtype=torch.float64)
    attention_sum = torch.zeros((), dtype=torch.float64)
    outputs = []
    try:
        with torch.no_grad(), onednn_linears(block), chunked_causal_attention(block):
            for h, kw in zip(hidden, kwargs, strict=True):
                captured.clear()
                out = _output(block(h, **kw))
                block_sum += cosine_distance_sum(h, out)
                attention_sum += cosine_distance_sum(h, h + captured[0])
                outputs.append(out)
    finally:
        handle.remove()
    return block_sum, attention_sum, outputs


def lowest(scores: torch.Tensor, count: int, exclude: Sequence[int] = ()) -> list[int]:
    """The ``count`` entries of lowest score, not in ``exclude`` (ties: the lower index first), sorted."""
    candidates = [i for i in torch.argsort(scores, stable=True).tolist() if i not in set(exclude)]
    if count > len(candidates):
        raise ValueError(f"cannot remove {count} of {len(candidates)} candidates")
    return sorted(candidates[:count])


def gatenorm_scores(model: nn.Module, family: Family, shape: Geometry) -> torch.Tensor:
    """Per block, the mean over query heads of ‖W_q,hᵀ W_k,g(h)‖_F: how strongly queries and keys couple
    (data-free; the input norm's scale included where the norm has a weight). ``(blocks,)`` float64."""
    _, blocks = find_blocks(model)
    scores = []
    for block in blocks:
        q_rows, k_rows = _query_key(
            block, family, shape
        )  # (heads, head_dim, hidden), (groups, head_dim, hidden)
        norm = block.get_submodule(family.decoder_norms[0]) if family.decoder_norms else None
        gamma = getattr(norm, "weight", None)
        if gamma is not None:
            q_rows, k_rows = q_rows * gamma.double(), k_rows * gamma.double()
        k_of_head = k_rows.repeat_interleave(shape.heads_per_group, dim=0)  # (heads, head_dim, hidden)
        # ‖Aᵀ B‖_F² = tr((A Aᵀ)(B Bᵀ)) with A, B (head_dim, hidden): head_dim x head_dim products only
        aa, bb = q_rows @ q_rows.transpose(1, 2), k_of_head @ k_of_head.transpose(1, 2)
        scores.append((aa * bb).sum(dim=(1, 2)).clamp(min=0).sqrt().mean())
    return torch.stack(scores)


def _query_key(block: nn.Module, family: Family, shape: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """The query rows per head and key rows per group, float64."""
    layers = dict(block.named_modules())
    query = get_weight(layers[family.query]).double()  # (rows, hidden)
    span = shape.heads * shape.head_dim
    if family.keys_values:
        key = get_weight(layers[family.keys_values[0]]).double()
    else:  # fused [query | key | value]
        query, key = query[:span], query[span : span + shape.kv_groups * shape.head_dim]
    return (
        query.reshape(shape.heads, shape.head_dim, -1),
        key.reshape(shape.kv_groups, shape.head_dim, -1),
    )


def remove_attention_(block: nn.Module, family: Family) -> None:
    """Replace the block's attention sublayer by :class:`ZeroAttention` (keeping its layer index)."""
    parent, _, child = family.attention.rpartition(".")
    owner = block.get_submodule(parent) if parent else block
    layer_idx = getattr(getattr(owner, child), "layer_idx", None)
    setattr(owner, child, ZeroAttention(layer_idx))


def remove_blocks_(model: nn.Module, removed: Sequence[int]) -> None:
    """Delete decoder blocks ``removed`` from the model; renumber the rest (attention ``layer_idx``, the
    config's ``num_hidden_layers`` / ``n_layer`` and per-layer ``layer_types``)."""
    if not removed:
        return
    name, blocks = find_blocks(model)
    kept = [i for i in range(len(blocks)) if i not in set(removed)]
    if not kept:
        raise ValueError("cannot remove every decoder block")
    new = nn.ModuleList([blocks[i] for i in kept])
    for index, block in enumerate(new):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    config = model.config
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(config, key):
            setattr(config, key, len(kept))
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept]
