"""What crosses the client/server boundary, as plain numpy arrays, and its validation.

Statistics travel as sums with counts; a Hessian as its upper triangle; layers whose inputs are identical
(q/k/v, gate/up) share one entry. Masks travel bit-packed (1 bit per weight). Every decoder validates
shape, dtype, finiteness and count range and raises :class:`PayloadError` with the reason.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from fedprune.masks import pack_bits, unpack_bits
from fedprune.stats import Stats

logger = logging.getLogger(__name__)


class PayloadError(ValueError):
    """A malformed payload; the message says why."""


def triu_of(matrix: torch.Tensor) -> torch.Tensor:
    """Upper triangle (with diagonal) of a symmetric ``(n, n)`` matrix, row-major, ``(n(n+1)/2,)``."""
    n = matrix.shape[0]
    rows, cols = torch.triu_indices(n, n)
    return matrix[rows, cols]


def symmetric_from_triu(values: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`triu_of`."""
    rows, cols = torch.triu_indices(n, n)
    matrix = torch.zeros(n, n, dtype=values.dtype)
    matrix[rows, cols] = values
    matrix[cols, rows] = values
    return matrix


def _unique_stats(stats: dict[str, Stats]) -> tuple[list[Stats], list[int]]:
    """Distinct statistics and, per layer (sorted by name), the index of its distinct entry."""
    unique: list[Stats] = []
    index: list[int] = []
    for name in sorted(stats):
        found = next(
            (
                i
                for i, u in enumerate(unique)
                if u.count == stats[name].count
                and u.total.shape == stats[name].total.shape
                and torch.equal(u.total, stats[name].total)
            ),
            None,
        )
        if found is None:
            unique.append(stats[name])
            found = len(unique) - 1
        index.append(found)
    return unique, index


def encode_stats(stats: dict[str, Stats]) -> dict[str, np.ndarray]:
    """Arrays for one block's statistics: ``total.<i>`` (float64), ``count`` and ``index`` (int64)."""
    unique, index = _unique_stats(stats)
    arrays = {
        f"total.{i}": (triu_of(s.total) if s.kind == "hessian" else s.total).numpy()
        for i, s in enumerate(unique)
    }
    arrays["count"] = np.array([s.count for s in unique], dtype=np.int64)
    arrays["index"] = np.array(index, dtype=np.int64)
    return arrays


def decode_stats(
    arrays: dict[str, np.ndarray], kind: str, in_features: dict[str, int], max_count: int
) -> dict[str, Stats]:
    """Validated statistics by layer name from :func:`encode_stats` arrays.

    Parameters
    ----------
    in_features : the expected layers of the block and their input width (the server's own model).
    max_count : the largest token count a client may claim.
    """
    names = sorted(in_features)
    index = _array(arrays, "index", np.int64, (len(names),))
    counts = _array(arrays, "count", np.int64, None)
    if counts.ndim != 1 or not ((counts >= 1) & (counts <= max_count)).all():
        raise PayloadError(f"token counts {counts.tolist()} outside [1, {max_count}]")
    if index.min(initial=0) < 0 or index.max(initial=0) >= counts.shape[0]:
        raise PayloadError("layer index points outside the statistics sent")
    out: dict[str, Stats] = {}
    for name, i in zip(names, index.tolist(), strict=True):
        n = in_features[name]
        shape = (n * (n + 1) // 2,) if kind == "hessian" else (n,)
        values = torch.from_numpy(_array(arrays, f"total.{i}", np.float64, shape).copy())
        total = symmetric_from_triu(values, n) if kind == "hessian" else values
        if kind == "sq_norm" and (total < 0).any():
            raise PayloadError(f"negative sum of squares for {name}")
        out[name] = Stats(kind=kind, total=total, count=int(counts[i]))
    return out


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
