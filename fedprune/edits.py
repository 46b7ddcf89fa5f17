"""Block edits: what a pruner (or a vote) decides for one decoder block, as types.

Each kind applies itself to a block, travels as named numpy arrays (``encode`` / ``decode``, validated),
gives one site's contribution to a vote (``votes``) and reports what it removed (``report``):

``MaskEdit``     keep-masks; the new weight is the block's dense weight times the mask.
``WeightEdit``   new weights (kept weights changed: SparseGPT's update, vote scaling) and their masks.
``KeptIndices``  structured: per layer the output rows or input columns kept; applying it makes the
                 layer smaller (fewer out / in features), so the saved model is physically smaller.

``EDITS`` maps the wire name of each kind (``BlockTask.update_kind``) to its class.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from fedprune.masks import sparsity_of
from fedprune.models import apply_weights_, find_prunable_layers, get_weight, is_transposed, set_weight_
from fedprune.payload import (
    PayloadError,
    checked_array,
    decode_masks,
    decode_weights,
    encode_masks,
    encode_weights,
)

logger = logging.getLogger(__name__)

Shapes = Mapping[str, tuple[int, int]]  # layer -> (out, in)


@dataclass(frozen=True)
class MaskEdit:
    """Keep-masks by layer, ``(out, in)`` bool; the block's own dense weights are kept where True."""

    masks: dict[str, torch.Tensor]
    kind: ClassVar[str] = "masks"

    def weights(self, block: nn.Module) -> dict[str, torch.Tensor]:
        """The pruned weights: ``block``'s dense weights times the masks."""
        layers = find_prunable_layers(block)
        return {name: get_weight(layers[name]) * mask for name, mask in self.masks.items()}

    def apply_(self, block: nn.Module) -> None:
        apply_weights_(block, self.weights(block))

    def encode(self) -> dict[str, np.ndarray]:
        return encode_masks(self.masks)

    @classmethod
    def decode(cls, arrays: Mapping[str, np.ndarray], shapes: Shapes) -> MaskEdit:
        return cls(decode_masks(dict(arrays), dict(shapes)))

    def votes(self) -> dict[str, torch.Tensor]:
        """This edit as one site's vote: 1 per kept weight (int32)."""
        return {name: mask.to(torch.int32) for name, mask in self.masks.items()}

    def report(self) -> dict[str, float]:
        """Fraction of weights removed, by layer."""
        return {name: sparsity_of(mask) for name, mask in self.masks.items()}


@dataclass(frozen=True)
class WeightEdit:
    """New ``(out, in)`` weights by layer, with the masks they were pruned to."""

    weights_by_layer: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    kind: ClassVar[str] = "weights"

    def weights(self, block: nn.Module | None = None) -> dict[str, torch.Tensor]:
        return dict(self.weights_by_layer)

    def apply_(self, block: nn.Module) -> None:
        apply_weights_(block, self.weights_by_layer)

    def encode(self) -> dict[str, np.ndarray]:
        return encode_weights(self.weights_by_layer)

    @classmethod
    def decode(cls, arrays: Mapping[str, np.ndarray], shapes: Shapes) -> WeightEdit:
        weights = decode_weights(dict(arrays), dict(shapes))
        return cls(weights, {name: w != 0 for name, w in weights.items()})

    def votes(self) -> dict[str, torch.Tensor]:
        return MaskEdit(self.masks).votes()

    def report(self) -> dict[str, float]:
        return MaskEdit(self.masks).report()


AXES = ("rows", "columns")  # rows: output features of the layer; columns: its input features


def shrink_layer(module: nn.Module, axis: str, index: torch.Tensor) -> nn.Module:
    """A new, smaller copy of a prunable layer keeping output ``rows`` or input ``columns`` ``index``."""
    weight = get_weight(module)  # (out, in)
    bias = None if getattr(module, "bias", None) is None else module.bias.detach()
    if axis == "rows":
        weight, bias = weight[index], None if bias is None else bias[index]
    else:
        weight = weight[:, index]
    out_features, in_features = weight.shape
    if is_transposed(module):
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(out_features, in_features)
        layer.weight = nn.Parameter(weight.t().contiguous().to(module.weight.dtype))
        layer.bias = nn.Parameter(bias.clone() if bias is not None else torch.zeros(out_features))
        return layer.to(module.weight.device)
    layer = nn.Linear(in_features, out_features, bias=bias is not None)
    layer = layer.to(dtype=module.weight.dtype, device=module.weight.device)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def replace_module_(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` inside ``root``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _check_index(name: str, axis: str, index: torch.Tensor, size: int) -> None:
    if axis not in AXES:
        raise PayloadError(f"kept indices of {name}: axis must be one of {AXES}, got {axis!r}")
    if index.dim() != 1 or index.numel() == 0:
        raise PayloadError(f"kept indices of {name}: need a non-empty 1-D index, got shape {tuple(index.shape)}")
    if int(index.min()) < 0 or int(index.max()) >= size:
        raise PayloadError(f"kept indices of {name}: outside [0, {size})")
    if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
        raise PayloadError(f"kept indices of {name}: must be strictly increasing")


@dataclass(frozen=True)
class KeptIndices:
    """Structured edit: by layer, which output rows or input columns stay (sorted, unique)."""

    kept: dict[str, tuple[str, torch.Tensor]]  # layer -> (axis, (kept,) int64)
    kind: ClassVar[str] = "kept"

    def apply_(self, block: nn.Module) -> None:
        """Replace each named layer of ``block`` by its smaller copy."""
        layers = find_prunable_layers(block)
        for name, (axis, index) in self.kept.items():
            replace_module_(block, name, shrink_layer(layers[name], axis, index))

    def encode(self) -> dict[str, np.ndarray]:
        return {f"kept.{axis}.{name}": index.to(torch.int64).numpy() for name, (axis, index) in self.kept.items()}

    @classmethod
    def decode(cls, arrays: Mapping[str, np.ndarray], shapes: Shapes) -> KeptIndices:
        """Validated kept indices for layers of ``shapes`` (each array ``kept.<axis>.<layer>``, int64)."""
        kept: dict[str, tuple[str, torch.Tensor]] = {}
        for key, value in arrays.items():
            prefix, _, rest = key.partition(".")
            axis, _, name = rest.partition(".")
            if prefix != "kept" or name not in shapes or axis not in AXES:
                raise PayloadError(f"unexpected array {key!r} in kept indices")
            if name in kept:
                raise PayloadError(f"kept indices of {name} given twice")
            array = np.asarray(value)
            if array.dtype != np.int64:
                raise PayloadError(f"{key}: dtype {array.dtype}, expected int64")
            index = torch.from_numpy(array.copy())
            _check_index(name, axis, index, shapes[name][0 if axis == "rows" else 1])
            kept[name] = (axis, index)
        return cls(kept)

    def votes(self, shapes: Shapes) -> dict[str, torch.Tensor]:
        """One site's vote: per layer, 1 for each kept row / column (int32, over that axis)."""
        out = {}
        for name, (axis, index) in self.kept.items():
            size = shapes[name][0 if axis == "rows" else 1]
            vote = torch.zeros(size, dtype=torch.int32)
            vote[index] = 1
            out[name] = vote
        return out

    def report(self, shapes: Shapes) -> dict[str, float]:
        """Fraction of the layer's weights removed, by layer."""
        return {
            name: 1.0 - index.numel() / shapes[name][0 if axis == "rows" else 1]
            for name, (axis, index) in self.kept.items()
        }


def with_bias(module: nn.Module, bias: torch.Tensor) -> nn.Module:
    """``module`` with its bias set to ``bias`` ``(out,)``: in place where it has one, else a new
    ``nn.Linear`` with the same weight and this bias."""
    if getattr(module, "bias", None) is not None:
        with torch.no_grad():
            module.bias.copy_(bias.to(module.bias.dtype))
        return module
    if not isinstance(module, nn.Linear):
        raise TypeError(f"cannot add a bias to {type(module).__name__}")
    layer = nn.Linear(module.in_features, module.out_features, bias=True)
    layer = layer.to(dtype=module.weight.dtype, device=module.weight.device)
    with torch.no_grad():
        layer.weight.copy_(module.weight)
        layer.bias.copy_(bias.to(module.weight.dtype))
    return layer


# module attributes a structured edit may set (head counts and widths that follow the kept heads)
STRUCTURE_ATTRIBUTES = ("num_heads", "split_size")


@dataclass(frozen=True)
class StructuredEdit:
    """Structured pruning of one block: kept rows / columns by layer (:class:`KeptIndices`), plus new
    weights of the smaller layers (an OBS update), new biases (mean compensation; a layer without one
    gets one) and the attention modules' head attributes that follow the kept heads.

    ``shapes``: the dense ``(out, in)`` of every layer in ``kept`` (what :meth:`report` measures against).
    """

    kept: dict[str, tuple[str, torch.Tensor]]
    shapes: dict[str, tuple[int, int]]
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (kept out, kept in)
    biases: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (kept out,)
    attributes: dict[str, int] = field(default_factory=dict)  # "<module>.<attribute>" -> value
    kind: ClassVar[str] = "structured"

    def kept_shape(self, name: str) -> tuple[int, int]:
        """The ``(out, in)`` of layer ``name`` after the edit."""
        out, inp = self.shapes[name]
        if name in self.kept:
            axis, index = self.kept[name]
            return (index.numel(), inp) if axis == "rows" else (out, index.numel())
        return out, inp

    def apply_(self, block: nn.Module) -> None:
        """Make ``block``'s layers smaller, then write the new weights, biases and attributes."""
        KeptIndices(self.kept).apply_(block)
        layers = find_prunable_layers(block)
        for name, weight in self.weights.items():
            set_weight_(layers[name], weight)
        for name, bias in self.biases.items():
            replace_module_(block, name, with_bias(layers[name], bias))
        for key, value in self.attributes.items():
            module, _, attribute = key.rpartition(".")
            setattr(block.get_submodule(module), attribute, int(value))

    def encode(self) -> dict[str, np.ndarray]:
        arrays = {"structured": np.array(1, dtype=np.int64)}  # never empty, even when nothing is kept out
        arrays.update(KeptIndices(self.kept).encode())
        arrays.update(encode_weights(self.weights))
        arrays.update({f"bias.{n}": b.detach().to(torch.float32).numpy() for n, b in self.biases.items()})
        arrays.update({f"attr.{k}": np.array(v, dtype=np.int64) for k, v in self.attributes.items()})
        return arrays

    @classmethod
    def decode(cls, arrays: Mapping[str, np.ndarray], shapes: Shapes) -> StructuredEdit:
        """Validated edit for a block of dense layer ``shapes``: indices in range, weights and biases of
        the kept shapes and finite, attributes among :data:`STRUCTURE_ATTRIBUTES` and positive."""
        parts: dict[str, dict[str, np.ndarray]] = {"kept": {}, "weight": {}, "bias": {}, "attr": {}}
        if "structured" not in arrays:
            raise PayloadError("a structured edit needs its 'structured' marker array")
        checked_array(arrays, "structured", np.int64, ())
        for key, value in arrays.items():
            if key == "structured":
                continue
            prefix = key.partition(".")[0]
            if prefix not in parts:
                raise PayloadError(f"unexpected array {key!r} in a structured edit")
            parts[prefix][key] = value
        kept = KeptIndices.decode(parts["kept"], shapes).kept
        edit = cls(kept, {name: tuple(shapes[name]) for name in kept})
        weight_shapes = {k.partition(".")[2]: k for k in parts["weight"]}
        bias_names = [k.partition(".")[2] for k in parts["bias"]]
        unknown = [n for n in [*weight_shapes, *bias_names] if n not in kept]
        if unknown:
            raise PayloadError(f"structured edit: weights or biases of layers without kept indices: {unknown}")
        weights = decode_weights(parts["weight"], {n: edit.kept_shape(n) for n in weight_shapes})
        biases = {
            n: torch.from_numpy(
                checked_array(parts["bias"], f"bias.{n}", np.float32, (edit.kept_shape(n)[0],)).copy()
            )
            for n in bias_names
        }
        attributes = {}
        for key in parts["attr"]:
            name = key.partition(".")[2]
            array = checked_array(parts["attr"], key, np.int64, ())
            if name.rpartition(".")[2] not in STRUCTURE_ATTRIBUTES or int(array) < 1:
                raise PayloadError(f"structured edit: attribute {name!r} = {int(array)} not allowed")
            attributes[name] = int(array)
        return cls(kept, edit.shapes, weights, biases, attributes)

    def votes(self, shapes: Shapes | None = None) -> dict[str, torch.Tensor]:
        """One site's vote: per layer, 1 for each kept row / column."""
        return KeptIndices(self.kept).votes(self.shapes)

    def report(self) -> dict[str, float]:
        """Fraction of the layer's weights removed, by layer."""
        return KeptIndices(self.kept).report(self.shapes)


EDITS: dict[str, type] = {cls.kind: cls for cls in (MaskEdit, WeightEdit, KeptIndices, StructuredEdit)}
BlockEdit = MaskEdit | WeightEdit | KeptIndices | StructuredEdit


def decode_edit(kind: str, arrays: Mapping[str, np.ndarray], shapes: Shapes) -> BlockEdit:
    """The edit of wire kind ``kind`` (``masks``, ``weights``, ``kept``), validated against ``shapes``."""
    if kind not in EDITS:
        raise PayloadError(f"unknown edit kind {kind!r}; known: {sorted(EDITS)}")
    return EDITS[kind].decode(arrays, shapes)
