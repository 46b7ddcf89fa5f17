"""One block's structured edit from its statistics: per coupling (FFN neurons, key/value groups) the
selector picks the kept units; the edit keeps their rows and columns and carries the consumer's update."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedprune.edits import StructuredEdit
from fedprune.models import find_blocks, find_prunable_layers, get_weight
from fedprune.stats import Stats
from fedprune.structured.depth import Influence, gatenorm_scores, lowest
from fedprune.structured.families import Coupling, Family, Geometry, block_layout, family_of, geometry
from fedprune.structured.select import Coupled, UnitChoice, get_selector
from fedprune.structured.targets import BlockTargets, block_targets, check_depth

logger = logging.getLogger(__name__)

DEPTH_BLOCKS, DEPTH_ATTENTION = "blocks", "attention"  # what depth pruning removes: whole blocks, sublayers
DEPTH_KINDS = (DEPTH_BLOCKS, DEPTH_ATTENTION)
DepthPick = Callable[[str, int, Sequence[int]], list[int]]  # (kind, count, excluded blocks) -> removed


@dataclass(frozen=True)
class Structure:
    """What structured pruning removes from one model: its family and dense widths, the units removed
    from every block, and how many whole blocks and attention sublayers go (:mod:`.depth`)."""

    family: Family
    shape: Geometry
    targets: BlockTargets
    blocks: int = 0
    attention: int = 0
    dense_blocks: int = 0

    @classmethod
    def for_model(
        cls, model: nn.Module, ffn: float, heads: float, blocks: int = 0, attention: int = 0
    ) -> Structure:
        family = family_of(model.config)
        shape = geometry(model.config, family)
        depth = len(find_blocks(model)[1])
        check_depth(blocks, attention, depth)
        return cls(family, shape, block_targets(ffn, heads, shape), blocks, attention, depth)

    @property
    def removes_depth(self) -> bool:
        return bool(self.blocks or self.attention)

    def data_depth(self, pruner: object) -> tuple[str, ...]:
        """The depth choices made from the dense pass's influence sums, of :data:`DEPTH_KINDS`
        (``"attention"`` not with ``pruner=gatenorm``: it ranks attention sublayers from the weights)."""
        wanted = {DEPTH_BLOCKS: self.blocks, DEPTH_ATTENTION: self.attention and pruner.name != "gatenorm"}
        return tuple(kind for kind in DEPTH_KINDS if wanted[kind])

    def needs_influence(self, pruner: object) -> bool:
        """Whether choosing blocks / attention sublayers needs the dense pass's influence sums."""
        return bool(self.data_depth(pruner))

    def depth_plan(self, influence: Influence | None, model: nn.Module, pruner: object) -> DepthPlan:
        """The blocks and attention sublayers to remove: least influence (attention: least query-key
        coupling with ``pruner=gatenorm``), attention only among the blocks that stay."""
        scores = {} if influence is None else {DEPTH_BLOCKS: influence.blocks, DEPTH_ATTENTION: influence.attention}
        return self.choose_depth(lambda kind, count, exclude: lowest(scores[kind].total, count, exclude), model, pruner)

    def choose_depth(self, pick: DepthPick, model: nn.Module, pruner: object) -> DepthPlan:
        """The :class:`DepthPlan` with ``pick(kind, count, exclude)`` choosing the removed blocks
        (``kind`` ``"blocks"``) and attention sublayers (``"attention"``, never in a removed block) that
        need data; ``pruner=gatenorm`` ranks attention sublayers from the dense weights of ``model``."""
        blocks = pick(DEPTH_BLOCKS, self.blocks, ()) if self.blocks else []
        attention: list[int] = []
        if DEPTH_ATTENTION in self.data_depth(pruner):
            attention = pick(DEPTH_ATTENTION, self.attention, blocks)
        elif self.attention:
            attention = lowest(gatenorm_scores(model, self.family, self.shape), self.attention, exclude=blocks)
        return DepthPlan(tuple(sorted(blocks)), tuple(sorted(attention)))

    @property
    def layout(self) -> dict[str, Coupling]:
        return block_layout(self.family, self.shape)

    def counts(self) -> dict[str, int]:
        """Units removed per block, by granularity."""
        return {"ffn": self.targets.ffn, "heads": self.targets.kv_groups}

    def edit(
        self, block: nn.Module, stats: Mapping[str, Stats], pruner: object, attention: bool = True
    ) -> StructuredEdit:
        """The structured edit of dense ``block`` (not modified) from its statistics (``attention``:
        False once the block's attention sublayer is removed: then no heads to choose)."""
        return structured_edit(block, stats, pruner, self, attention)


@dataclass(frozen=True)
class DepthPlan:
    """Removed decoder blocks and removed attention sublayers (of blocks that stay), by block index."""

    blocks: tuple[int, ...] = ()
    attention: tuple[int, ...] = ()


def check_dense(layers: Mapping[str, nn.Module], coupling: Coupling) -> None:
    """The block's coupled layers have the dense widths the layout expects."""
    for axis, mapping in (("rows", coupling.rows), ("columns", coupling.columns)):
        for name, index in mapping.items():
            if name not in layers:
                raise ValueError(f"the block has no prunable layer {name!r} ({coupling.granularity} units)")
            out, inp = get_weight(layers[name]).shape
            size = out if axis == "rows" else inp
            if int(index.max()) >= size:
                raise ValueError(
                    f"{name} has {size} {axis}, fewer than its {coupling.units} dense "
                    f"{coupling.granularity} units need (an already pruned block?)"
                )


def head_attributes(structure: Structure, kept_groups: int) -> dict[str, int]:
    """The attention module's attributes that follow ``kept_groups`` key/value groups."""
    shape, family = structure.shape, structure.family
    heads = kept_groups * shape.heads_per_group
    values = {"num_heads": heads, "split_size": heads * shape.head_dim}
    return {f"{family.attention}.{attr}": values[attr] for attr in family.attention_attrs}


def coupling_kept(coupling: Coupling, units: torch.Tensor) -> dict[str, tuple[str, torch.Tensor]]:
    """The kept rows of every producer and the kept columns of the consumer when ``units`` (ids) stay."""
    kept = {name: ("rows", index[units].reshape(-1).sort().values) for name, index in coupling.rows.items()}
    kept[coupling.consumer] = (
        "columns",
        coupling.columns[coupling.consumer][units].reshape(-1).sort().values,
    )
    return kept


def structured_edit(
    block: nn.Module, stats: Mapping[str, Stats], pruner: object, structure: Structure, attention: bool = True
) -> StructuredEdit:
    """Select the kept units of each coupling with ``pruner``'s selector; the block is not modified."""
    layers = find_prunable_layers(block)
    kept, weights, biases, attributes = {}, {}, {}, {}
    for granularity, count in structure.counts().items():
        if not count or (granularity == "heads" and not attention):
            continue
        selector = get_selector(pruner.name)
        coupling = structure.layout[granularity]
        check_dense(layers, coupling)
        consumer = layers[coupling.consumer]
        # selection on the CPU whatever the model's device (the edit moves to the block when applied)
        bias = None if getattr(consumer, "bias", None) is None else consumer.bias.detach().cpu().clone()
        names = [*coupling.rows, coupling.consumer]
        coupled = Coupled(coupling, {name: get_weight(layers[name]).cpu() for name in names}, bias)
        cpu_stats = {name: Stats(s.kind, s.total.cpu(), s.count) for name, s in stats.items()}
        choice: UnitChoice = selector(pruner, coupled, cpu_stats, count)
        if choice.kept.numel() != coupling.units - count:
            raise RuntimeError(
                f"{pruner.name} kept {choice.kept.numel()} of {coupling.units} units, not {coupling.units - count}"
            )
        kept.update(coupling_kept(coupling, choice.kept))
        columns = kept[coupling.consumer][1]
        if choice.consumer_weight is not None:
            weights[coupling.consumer] = choice.consumer_weight[:, columns]
        if choice.consumer_bias is not None:
            biases[coupling.consumer] = choice.consumer_bias
        if granularity == "heads":
            attributes.update(head_attributes(structure, int(choice.kept.numel())))
    shapes = {name: tuple(get_weight(layers[name]).shape) for name in kept}
    return StructuredEdit(kept, shapes, weights, biases, attributes)
