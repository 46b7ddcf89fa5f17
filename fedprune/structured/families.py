"""Which layers of a decoder block form one structured unit, per model family: one small table.

A *unit* is what structured pruning removes as a whole:

- an **FFN neuron** j: row j of every FFN producer (up/gate, fc1, c_fc) and column j of the FFN consumer
  (down, fc2, c_proj);
- a **key/value group** g: the key and value rows of g, the rows of every query head that uses g, and
  the matching input columns of the attention output projection (so grouped-query attention stays valid;
  without GQA a group is one head).

Each coupled layer maps a unit to its rows (producers) or columns (consumer) as *segments*
``(offset, width)``: unit u owns ``offset + u * width + arange(width)`` for every segment (GPT-2's fused
``c_attn`` has three: its query, key and value thirds). :func:`block_layout` turns the table and a model
config into the index tensors of one block.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

Segment = tuple[int, int]  # (offset, width): unit u owns offset + u * width + arange(width)


@dataclass(frozen=True)
class Family:
    """The coupled layers of one model family (names relative to a decoder block) and its config keys.

    ``heads_in_config``: the config can state fewer heads with the same head size (an explicit
    ``head_dim``), so a uniformly pruned model loads with ``from_pretrained``. ``attention_attrs``: module
    attributes that hold head counts or widths and must follow the kept heads (``load_pruned`` sets them).
    """

    name: str
    model_types: tuple[str, ...]
    ffn_producers: tuple[str, ...]
    ffn_consumer: str
    query: str  # the layer holding the query rows (GPT-2: the fused c_attn)
    keys_values: tuple[str, ...]  # separate key and value layers ("" entries: fused into ``query``)
    attn_consumer: str
    attention: str  # the attention submodule
    decoder_norms: tuple[str, ...]  # the norms before attention, before the FFN
    ffn_key: str  # config key of the FFN width
    heads_key: str
    kv_heads_key: str  # "" when every head is its own group
    heads_in_config: bool
    attention_attrs: tuple[str, ...] = ()
    # config flags that give every layer of a part ("mlp", "attention") a bias, where the model type has them
    bias_keys: Mapping[str, str] = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            name="llama",
            model_types=("llama", "qwen2", "mistral"),
            ffn_producers=("mlp.gate_proj", "mlp.up_proj"),
            ffn_consumer="mlp.down_proj",
            query="self_attn.q_proj",
            keys_values=("self_attn.k_proj", "self_attn.v_proj"),
            attn_consumer="self_attn.o_proj",
            attention="self_attn",
            decoder_norms=("input_layernorm", "post_attention_layernorm"),
            ffn_key="intermediate_size",
            heads_key="num_attention_heads",
            kv_heads_key="num_key_value_heads",
            heads_in_config=True,
            bias_keys={"mlp": "mlp_bias", "attention": "attention_bias"},  # Llama's (Qwen2, Mistral: none)
        ),
        Family(
            name="opt",
            model_types=("opt",),
            ffn_producers=("fc1",),
            ffn_consumer="fc2",
            query="self_attn.q_proj",
            keys_values=("self_attn.k_proj", "self_attn.v_proj"),
            attn_consumer="self_attn.out_proj",
            attention="self_attn",
            decoder_norms=("self_attn_layer_norm", "final_layer_norm"),
            ffn_key="ffn_dim",
            heads_key="num_attention_heads",
            kv_heads_key="",
            heads_in_config=False,
            attention_attrs=("num_heads",),
        ),
        Family(
            name="gpt2",
            model_types=("gpt2",),
            ffn_producers=("mlp.c_fc",),
            ffn_consumer="mlp.c_proj",
            query="attn.c_attn",
            keys_values=(),
            attn_consumer="attn.c_proj",
            attention="attn",
            decoder_norms=("ln_1", "ln_2"),
            ffn_key="n_inner",
            heads_key="n_head",
            kv_heads_key="",
            heads_in_config=False,
            attention_attrs=("num_heads", "split_size"),
        ),
    )
}


class UnsupportedFamilyError(ValueError):
    """Structured pruning does not know which layers of this model family are coupled."""


def family_of(config: object) -> Family:
    """The family of an HF config (by ``model_type``); an error naming the families that work."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise UnsupportedFamilyError(
        f"structured pruning does not support model type {model_type!r}; supported: {', '.join(known)}"
    )


@dataclass(frozen=True)
class Geometry:
    """The widths of a dense block: hidden size, FFN width, heads, key/value groups, head size."""

    hidden: int
    ffn: int
    heads: int
    kv_groups: int
    head_dim: int

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.kv_groups


def geometry(config: object, family: Family) -> Geometry:
    """The dense block widths from an HF config."""
    hidden = int(getattr(config, "hidden_size", None) or config.n_embd)
    heads = int(getattr(config, family.heads_key))
    kv = int(getattr(config, family.kv_heads_key, None) or heads) if family.kv_heads_key else heads
    ffn = getattr(config, family.ffn_key, None) or 4 * hidden  # GPT-2: n_inner None means 4 x n_embd
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    if heads % kv:
        raise ValueError(f"{heads} query heads do not split into {kv} key/value groups")
    return Geometry(hidden=hidden, ffn=int(ffn), heads=heads, kv_groups=kv, head_dim=head_dim)


@dataclass(frozen=True)
class Coupling:
    """One granularity of one block: ``rows[layer]`` and ``columns[layer]`` are ``(units, width)`` int64
    index tensors (unit u owns row / column indices ``[u]`` of that layer)."""

    granularity: str  # "ffn" | "heads"
    units: int
    rows: Mapping[str, torch.Tensor]
    columns: Mapping[str, torch.Tensor]

    @property
    def consumer(self) -> str:
        (name,) = self.columns
        return name


def unit_indices(units: int, segments: tuple[Segment, ...]) -> torch.Tensor:
    """``(units, total width)`` indices: per unit, the concatenation of its part of each segment."""
    parts = [
        offset + torch.arange(units).unsqueeze(1) * width + torch.arange(width).unsqueeze(0)
        for offset, width in segments
    ]
    return torch.cat(parts, dim=1)  # (units, sum of widths)


def block_layout(family: Family, shape: Geometry) -> dict[str, Coupling]:
    """The FFN and key/value-group couplings of one dense block."""
    ffn = Coupling(
        "ffn",
        shape.ffn,
        {name: unit_indices(shape.ffn, ((0, 1),)) for name in family.ffn_producers},
        {family.ffn_consumer: unit_indices(shape.ffn, ((0, 1),))},
    )
    q_width, kv_width = shape.heads_per_group * shape.head_dim, shape.head_dim
    if family.keys_values:
        rows = {family.query: unit_indices(shape.kv_groups, ((0, q_width),))}
        rows.update({name: unit_indices(shape.kv_groups, ((0, kv_width),)) for name in family.keys_values})
    else:  # fused [query | key | value] rows
        span = shape.heads * shape.head_dim
        q_span = shape.kv_groups * kv_width
        segments = ((0, q_width), (span, kv_width), (span + q_span, kv_width))
        rows = {family.query: unit_indices(shape.kv_groups, segments)}
    heads = Coupling(
        "heads", shape.kv_groups, rows, {family.attn_consumer: unit_indices(shape.kv_groups, ((0, q_width),))}
    )
    return {"ffn": ffn, "heads": heads}


def valid_head_fractions(shape: Geometry) -> list[float]:
    """The fractions of query heads that whole key/value groups can remove (at least one group stays)."""
    return [g / shape.kv_groups for g in range(shape.kv_groups)]
