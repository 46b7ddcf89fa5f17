"""Server-side aggregation: sign majority vote, score averaging, 1-bit sign codec, FedAvg, and the
``score_delta`` upload codec (signs, clip scale and exact top changes in one uint8 array).

Sign vectors are flat ``(n,)`` int8 in {-1, +1} holding only the *kept* weights, concatenated in the
key order of the prune-mask dict (:func:`gather_kept` / :func:`scatter_kept`); both ends must use the
same mask dict, which the server builds once and broadcasts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from fedprune.masks import pack_bits, unpack_bits

logger = logging.getLogger(__name__)


def _check_signs(signs: torch.Tensor) -> None:
    """Raise ValueError unless every entry is -1 or +1."""
    if not bool(((signs == 1) | (signs == -1)).all()):
        raise ValueError("signs must all be -1 or +1")


def majority_vote_signs(sign_stack: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """Per-weight majority of ``sign_stack (clients, n)``; a tie keeps ``current (n,)``. -> ``(n,)`` int8."""
    _check_signs(sign_stack)
    _check_signs(current)
    votes = sign_stack.to(torch.int32).sum(dim=0)  # (n,)
    return torch.where(votes == 0, current.to(torch.int32), votes.sign()).to(torch.int8)


def average_scores(score_stack: torch.Tensor, weights: Sequence[float] | None = None) -> torch.Tensor:
    """Weighted mean of real-valued scores ``(clients, n)`` -> ``(n,)``; equal weights when ``None``."""
    num_clients = score_stack.shape[0]
    w = torch.ones(num_clients) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    if w.numel() != num_clients or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError("need one non-negative weight per client with a positive sum")
    w = (w / w.sum()).to(score_stack.dtype)
    return (w.reshape(-1, 1) * score_stack).sum(dim=0)


def signs_of_scores(scores: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """``sign(scores)`` as int8, keeping ``current`` where a score is exactly 0."""
    return torch.where(scores == 0, current.to(torch.int8), torch.where(scores > 0, 1, -1).to(torch.int8))


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """1 bit per sign (``+1 -> 1``, ``-1 -> 0``): ``(n,)`` -> ``(ceil(n / 8),)`` uint8."""
    _check_signs(signs)
    return pack_bits(signs.reshape(-1) > 0)


def unpack_signs(packed: torch.Tensor, num_signs: int) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: ``(n,)`` int8 in {-1, +1}."""
    bits = unpack_bits(packed, (num_signs,))  # (n,) bool
    return torch.where(bits, 1, -1).to(torch.int8)


def num_kept_weights(masks: dict[str, torch.Tensor]) -> int:
    """Number of kept (True) entries over all masks = length of a flat sign vector."""
    return sum(int(mask.sum()) for mask in masks.values())


def gather_kept(tensors: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """The entries of ``tensors`` at kept positions, concatenated in ``masks`` key order: ``(n_kept,)``."""
    return torch.cat([tensors[name][mask] for name, mask in masks.items()])


def scatter_kept(
    flat: torch.Tensor, masks: dict[str, torch.Tensor], fill: int | float = 1
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`gather_kept`: full-shape tensors with ``fill`` at pruned positions."""
    if flat.numel() != num_kept_weights(masks):
        raise ValueError(f"got {flat.numel()} values for {num_kept_weights(masks)} kept weights")
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, mask in masks.items():
        count = int(mask.sum())
        full = torch.full(mask.shape, fill, dtype=flat.dtype)
        full[mask] = flat[offset : offset + count]
        out[name] = full
        offset += count
    return out


def fedavg(states: Sequence[dict[str, torch.Tensor]], num_samples: Sequence[int]) -> dict[str, torch.Tensor]:
    """Sample-weighted average of float parameter dicts (same keys and shapes) -> new dict."""
    if len(states) == 0 or len(states) != len(num_samples):
        raise ValueError("need one sample count per state and at least one state")
    if any(n < 0 for n in num_samples) or sum(num_samples) <= 0:
        raise ValueError("sample counts must be non-negative with a positive sum")
    total = float(sum(num_samples))
    return {
        key: sum(state[key].double() * (n / total) for state, n in zip(states, num_samples, strict=True)).to(
            states[0][key].dtype
        )
        for key in states[0]
    }


def delta_scale(delta: torch.Tensor, quantile: float) -> float:
    """The clip scale ``B``: the ``quantile`` of ``|delta|``, at least the smallest positive float32."""
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    scale = float(torch.quantile(delta.abs().double(), quantile)) if delta.numel() else 0.0
    return max(scale, float(torch.finfo(torch.float32).tiny))


def stochastic_signs(delta: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """1-bit stochastic rounding of ``delta (n,)`` at ``scale``: int8 ``+1`` w.p. ``(1 + clip(delta / scale)) / 2``.

    ``scale * signs`` is an unbiased estimate of ``delta`` where ``|delta| <= scale`` and of
    ``clip(delta, -scale, scale)`` elsewhere.
    """
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    p_plus = (1 + (delta.double() / scale).clamp(-1.0, 1.0)) / 2  # (n,)
    draw = torch.rand(delta.shape, generator=generator, dtype=torch.float64)
    return torch.where(draw < p_plus, 1, -1).to(torch.int8)


def add_score_delta(
    scores: torch.Tensor,
    sign_stack: torch.Tensor,
    scales: Sequence[float],
    weights: Sequence[float],
    server_lr: float,
    tops: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
) -> torch.Tensor:
    """``scores + server_lr * sum_i w_i change_i / sum_i w_i``: the global scores after one round.

    ``sign_stack (clients, n)`` holds the sites' :func:`stochastic_signs` of their score changes and
    ``scales`` their clip scales; ``tops`` a site's exact top changes ``(index, values)`` or None
    (:func:`decoded_change`). Returns float32 ``(n,)``.
    """
    _check_signs(sign_stack)
    if len(scales) != sign_stack.shape[0] or any(s < 0 for s in scales):
        raise ValueError("need one non-negative scale per client")
    tops = [None] * len(scales) if tops is None else tops
    if len(tops) != len(scales):
        raise ValueError("need one top-change entry (or None) per client")
    scaled = torch.stack(
        [
            decoded_change(signs, scale, *(top if top is not None else (None, None)))
            for signs, scale, top in zip(sign_stack, scales, tops, strict=True)
        ]
    )  # (clients, n)
    return (scores.double() + server_lr * average_scores(scaled, weights)).float()


MAX_TOP_INDEX = 1 << 16  # top changes carry uint16 indices


def top_count(num_kept: int, fraction: float) -> int:
    """How many of ``num_kept`` score changes a site sends exactly: ``floor(fraction * num_kept)``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    count = int(fraction * num_kept)
    if count and num_kept > MAX_TOP_INDEX:
        raise ValueError(f"top changes need num_kept <= {MAX_TOP_INDEX} (uint16 indices), got {num_kept}")
    return count


def top_changes(delta: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` entries of ``delta (n,)`` largest in magnitude: sorted int64 indices, float16 values.

    Values are clamped to the float16 range before the cast.
    """
    if not 0 <= count <= delta.numel():
        raise ValueError(f"count must be in [0, {delta.numel()}], got {count}")
    index = delta.abs().topk(count).indices.sort().values  # (count,)
    limit = float(torch.finfo(torch.float16).max)
    return index, delta[index].clamp(-limit, limit).to(torch.float16)


def pack_top(index: torch.Tensor, values: torch.Tensor) -> np.ndarray:
    """Indices (< 2**16) then the float16 bit patterns of the values, in one uint16 ``(2 * count,)``."""
    if index.numel() != values.numel() or values.dtype != torch.float16:
        raise ValueError("need one float16 value per index")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= MAX_TOP_INDEX):
        raise ValueError(f"indices must be in [0, {MAX_TOP_INDEX})")
    return np.concatenate([index.numpy().astype(np.uint16), values.numpy().view(np.uint16)])


def unpack_top(packed: np.ndarray, num_kept: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_top`: int64 indices and float32 values; ValueError if they are not valid.

    Valid: uint16 of even length, indices strictly increasing and ``< num_kept``, values finite.
    """
    if packed.dtype != np.uint16 or packed.ndim != 1 or packed.size % 2:
        raise ValueError(f"top changes must be uint16 of even length, got {packed.dtype} {packed.shape}")
    count = packed.size // 2
    index = torch.from_numpy(packed[:count].astype(np.int64))
    values = torch.from_numpy(np.ascontiguousarray(packed[count:]).view(np.float16).astype(np.float32))
    if count and (int(index[-1]) >= num_kept or bool((index[1:] <= index[:-1]).any())):
        raise ValueError(f"top indices must be strictly increasing and < {num_kept}")
    if not bool(torch.isfinite(values).all()):
        raise ValueError("top values hold NaN or Inf")
    return index, values


def decoded_change(
    signs: torch.Tensor, scale: float, index: torch.Tensor | None = None, values: torch.Tensor | None = None
) -> torch.Tensor:
    """A site's score change as the server reads it: ``scale * signs``, with ``values`` at ``index``.

    Returns float64 ``(n,)``.
    """
    change = signs.double() * scale
    if index is not None and values is not None:
        change[index] = values.double()
    return change


SCALE_BYTES = 4  # the clip scale: one little-endian float32


def delta_upload_size(num_kept: int, count: int) -> int:
    """Bytes of a ``score_delta`` upload (:func:`pack_delta_upload`).

    Parameters
    ----------
    num_kept : number of kept weights (one sign bit each).
    count : number of exact top changes (:func:`top_count`), 4 bytes each.

    Returns
    -------
    ``ceil(num_kept / 8) + 4 + 4 * count``.
    """
    if num_kept < 0 or not 0 <= count <= num_kept:
        raise ValueError(f"need 0 <= count <= num_kept, got count {count}, num_kept {num_kept}")
    return (num_kept + 7) // 8 + SCALE_BYTES + 4 * count


def pack_delta_upload(
    signs: torch.Tensor, scale: float, index: torch.Tensor, values: torch.Tensor
) -> np.ndarray:
    """A site's ``score_delta`` upload as one uint8 array.

    Parameters
    ----------
    signs : ``(n,)`` int8 in {-1, +1}, the :func:`stochastic_signs` of the score change.
    scale : the clip scale, finite and >= 0 (sent as float32).
    index, values : the exact top changes (:func:`top_changes`): ``(count,)`` indices < 2**16 and float16.

    Returns
    -------
    ``(delta_upload_size(n, count),)`` uint8: :func:`pack_signs` (``ceil(n / 8)`` bytes), the scale as a
    little-endian float32, then the ``count`` uint16 indices and the ``count`` float16 values,
    little-endian.
    """
    scale32 = np.array([scale], dtype="<f4")
    if not np.isfinite(scale32).all() or scale32[0] < 0:
        raise ValueError(f"scale must be finite and >= 0 as float32, got {scale}")
    top = pack_top(index, values).astype("<u2")  # (2 * count,)
    return np.concatenate([pack_signs(signs).numpy(), scale32.view(np.uint8), top.view(np.uint8)])


def unpack_delta_upload(
    packed: np.ndarray, num_kept: int, count: int
) -> tuple[torch.Tensor, float, tuple[torch.Tensor, torch.Tensor] | None]:
    """Inverse of :func:`pack_delta_upload`; ValueError naming what is wrong if ``packed`` is not valid.

    Parameters
    ----------
    packed : the uploaded array.
    num_kept, count : public numbers that fix the layout (:func:`delta_upload_size`).

    Returns
    -------
    signs : ``(num_kept,)`` int8 in {-1, +1}.
    scale : the clip scale.
    top : int64 indices and float32 values of the exact changes (:func:`unpack_top`), None if ``count == 0``.

    Valid: uint8 ``(delta_upload_size(num_kept, count),)``, zero padding bits after the last sign, a finite
    scale >= 0, and top changes that :func:`unpack_top` accepts.
    """
    size = delta_upload_size(num_kept, count)
    if packed.dtype != np.uint8 or packed.shape != (size,):
        raise ValueError(f"delta upload must be uint8 ({size},), got {packed.dtype} {packed.shape}")
    code_bytes = (num_kept + 7) // 8
    spare = -num_kept % 8  # padding bits in the last code byte (the low ones)
    if spare and int(packed[code_bytes - 1]) & ((1 << spare) - 1):
        raise ValueError("delta upload has nonzero padding bits after the last sign")
    codes = torch.from_numpy(np.ascontiguousarray(packed[:code_bytes]))
    scale = float(packed[code_bytes : code_bytes + SCALE_BYTES].view("<f4")[0])
    if not np.isfinite(scale) or scale < 0:
        raise ValueError(f"delta upload scale must be finite and >= 0, got {scale}")
    top_bytes = np.ascontiguousarray(packed[code_bytes + SCALE_BYTES :])
    top = unpack_top(top_bytes.view("<u2").astype(np.uint16), num_kept) if count else None
    return unpack_signs(codes, num_kept), scale, top
