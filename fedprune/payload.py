"""What crosses the client/server boundary, as plain numpy arrays, and its validation.

Statistics travel as sums with counts; a Hessian as its upper triangle; layers whose inputs are identical
(q/k/v, gate/up) share one entry. Masks travel bit-packed (1 bit per weight). Every decoder validates
shape, dtype, finiteness and count range and raises :class:`PayloadError` with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch

from fedprune.masks import pack_bits, unpack_bits
from fedprune.stat_kinds import (  # noqa: F401  (triu_of, symmetric_from_triu: public here too)
    StatKind,
    get_stat_kind,
    symmetric_from_triu,
    triu_of,
)
from fedprune.stats import BlockStats, Stats, as_block_stats

logger = logging.getLogger(__name__)


class PayloadError(ValueError):
    """A malformed payload; the message says why (``label``: what a rejected reply is logged as)."""

    label = "malformed reply"


def encode_stats(stats: Mapping[str, Stats]) -> dict[str, np.ndarray]:
    """Arrays for one block's statistics: ``total.<i>`` (float64), ``count`` and ``index`` (int64).

    One ``total.<i>`` per group of layers sharing one input (:class:`BlockStats` groups; for a plain
    dict, layers holding the same Stats object), numbered in sorted layer-name order; ``index`` gives
    each layer's (sorted by name) entry.
    """
    block = as_block_stats(stats)
    arrays = {
        f"total.{i}": get_stat_kind(s.kind).to_wire(s.total).numpy() for i, s in enumerate(block.group_stats)
    }
    arrays["count"] = np.array([s.count for s in block.group_stats], dtype=np.int64)
    arrays["index"] = np.array(block.index, dtype=np.int64)
    return arrays


def decode_stats(
    arrays: dict[str, np.ndarray],
    kind: str | StatKind,
    in_features: dict[str, int],
    max_count: int,
    noisy: bool = False,
) -> BlockStats:
    """Validated statistics by layer name from :func:`encode_stats` arrays.

    Layers sharing one entry share one :class:`Stats` object (a :class:`BlockStats` group).

    Parameters
    ----------
    in_features : the expected layers of the block and their input width (the server's own model).
    max_count : the largest token count a client may claim.
    noisy : the sums carry DP noise: project each onto the possible sums (the kind's ``project_noisy``,
        free post-processing) before it is validated.
    """
    spec = get_stat_kind(kind)
    names = sorted(in_features)
    index = _array(arrays, "index", np.int64, (len(names),))
    counts = _array(arrays, "count", np.int64, None)
    if counts.ndim != 1 or not ((counts >= 1) & (counts <= max_count)).all():
        raise PayloadError(f"token counts {counts.tolist()} outside [1, {max_count}]")
    if index.min(initial=0) < 0 or index.max(initial=0) >= counts.shape[0]:
        raise PayloadError("layer index points outside the statistics sent")
    decoded: dict[int, Stats] = {}
    members: dict[int, list[str]] = {}
    for name, i in zip(names, index.tolist(), strict=True):
        n = in_features[name]
        values = _array(arrays, f"total.{i}", np.float64, (spec.wire_length(n),))
        if i not in decoded:
            decoded[i] = _decode_entry(spec, values, n, int(counts[i]), name, noisy)
        members.setdefault(i, []).append(name)
    return BlockStats({tuple(group): decoded[i] for i, group in members.items()})


def _decode_entry(spec: StatKind, values: np.ndarray, n: int, count: int, name: str, noisy: bool) -> Stats:
    """One validated entry from its wire values ``(wire_length(n),)``."""
    total = spec.from_wire(torch.from_numpy(values.copy()), n)  # spec.shape(n)
    if noisy:
        total = spec.project_noisy(total)
    if (reason := spec.invalid_reason(total)) is not None:
        raise PayloadError(f"{reason} for {name}")
    return Stats(kind=spec.name, total=total, count=count)


def encode_masks(masks: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Bit-packed keep-masks, ``mask.<layer>`` -> uint8."""
    return {f"mask.{name}": pack_bits(mask).numpy() for name, mask in masks.items()}


def decode_masks(
    arrays: dict[str, np.ndarray], shapes: dict[str, tuple[int, int]]
) -> dict[str, torch.Tensor]:
    """Validated keep-masks by layer from :func:`encode_masks` arrays."""
    out = {}
    for name, shape in shapes.items():
        nbytes = (shape[0] * shape[1] + 7) // 8
        packed = _array(arrays, f"mask.{name}", np.uint8, (nbytes,))
        out[name] = unpack_bits(torch.from_numpy(packed.copy()), shape)
    return out


def encode_weights(weights: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Float32 ``(out, in)`` weights, ``weight.<layer>``."""
    return {f"weight.{name}": w.detach().to(torch.float32).numpy() for name, w in weights.items()}


def decode_weights(
    arrays: dict[str, np.ndarray], shapes: dict[str, tuple[int, int]]
) -> dict[str, torch.Tensor]:
    """Validated weights by layer from :func:`encode_weights` arrays."""
    return {
        name: torch.from_numpy(_array(arrays, f"weight.{name}", np.float32, shape).copy())
        for name, shape in shapes.items()
    }


def payload_bytes(arrays: dict[str, np.ndarray]) -> int:
    """Bytes of array data in a payload."""
    return int(sum(a.nbytes for a in arrays.values()))


def _array(arrays: dict[str, np.ndarray], key: str, dtype: type, shape: tuple | None) -> np.ndarray:
    """``arrays[key]`` checked for presence, dtype, shape and finiteness."""
    if key not in arrays:
        raise PayloadError(f"missing array {key!r}")
    value = np.asarray(arrays[key])
    if value.dtype != dtype:
        raise PayloadError(f"{key}: dtype {value.dtype}, expected {np.dtype(dtype)}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise PayloadError(f"{key}: shape {tuple(value.shape)}, expected {tuple(shape)}")
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        raise PayloadError(f"{key}: contains NaN or Inf")
    return value


checked_array = _array  # public name: other modules validate their arrays the same way
