"""How many units each block loses: the ``structured`` fractions turned into counts, checked against the
model before any work."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fedprune.structured.families import Geometry, family_of, geometry, valid_head_fractions

logger = logging.getLogger(__name__)

HEAD_TOLERANCE = 0.01  # structured.heads may differ this much from a fraction whole groups give (0.33 ~ 1/3)


@dataclass(frozen=True)
class BlockTargets:
    """Units removed in one block: FFN neurons and key/value groups."""

    ffn: int = 0
    kv_groups: int = 0


class StructureError(ValueError):
    """``structured`` fractions that the model cannot realise; ``key`` is the config key at fault."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def block_targets(ffn: float, heads: float, shape: Geometry) -> BlockTargets:
    """Units to remove per block: ``round(ffn · width)`` neurons (at least one stays) and the key/value
    groups that remove ``heads`` of the query heads (:class:`StructureError` when no whole number of
    groups does, naming the valid fractions)."""
    neurons = round(ffn * shape.ffn)
    if ffn > 0 and not 0 < neurons < shape.ffn:
        raise StructureError(
            "structured.ffn", f"{ffn} of {shape.ffn} FFN neurons is {neurons}; remove at least one, keep one"
        )
    groups = round(heads * shape.kv_groups)
    if abs(groups / shape.kv_groups - heads) > HEAD_TOLERANCE or groups >= shape.kv_groups:
        valid = ", ".join(f"{f:.4g}" for f in valid_head_fractions(shape))
        nearest = min(valid_head_fractions(shape), key=lambda f: abs(f - heads))
        raise StructureError(
            "structured.heads",
            f"{heads} of the {shape.heads} query heads is not a whole number of the {shape.kv_groups} "
            f"key/value groups ({shape.heads_per_group} heads each); valid: {valid} (nearest: {nearest:.4g})",
        )
    return BlockTargets(ffn=neurons, kv_groups=groups)


def check_structure(model_path: str, ffn: float, heads: float, blocks: int = 0, attention: int = 0) -> None:
    """The ``structured`` counts against the model folder's config (no weights loaded);
    :class:`UnsupportedFamilyError` or :class:`StructureError` naming the key."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    block_targets(ffn, heads, geometry(config, family_of(config)))
    check_depth(blocks, attention, int(getattr(config, "num_hidden_layers", None) or config.n_layer))


def check_depth(blocks: int, attention: int, depth: int) -> None:
    """At least one block stays; attention sublayers are removed only from blocks that stay."""
    if not 0 <= blocks < depth:
        raise StructureError(
            "structured.blocks", f"must be in [0, {depth - 1}] for {depth} blocks, got {blocks}"
        )
    if not 0 <= attention <= depth - blocks:
        raise StructureError(
            "structured.attention",
            f"must be in [0, {depth - blocks}] ({depth} blocks, {blocks} removed), got {attention}",
        )
