"""Encodings of float64 and integer arrays as integers modulo 2^k, for summation under masking.

Values live in Z_{2^k} (``k = modulus_bits``, 2..64) stored in ``np.uint64``; numpy's unsigned array
arithmetic wraps modulo 2^64 and, because 2^k divides 2^64, reducing the wrapped result with
``& (2^k - 1)`` gives arithmetic modulo 2^k. Negative numbers use two's complement: a sum is decoded as
the representative in ``[-2^(k-1), 2^(k-1))``, so it is exact as long as the true integer sum lies in
that range. Both codes below check this at construction from PUBLIC bounds (``clip`` or ``max_abs``
and ``max_clients``), never from one client's data.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

logger = logging.getLogger(__name__)


def check_modulus_bits(modulus_bits: int) -> int:
    """Validate ``k`` for the modulus 2^k (2 <= k <= 64)."""
    if not isinstance(modulus_bits, int) or not 2 <= modulus_bits <= 64:
        raise ValueError(f"modulus_bits must be an int in [2, 64], got {modulus_bits!r}")
    return modulus_bits


def modulus_mask(modulus_bits: int) -> np.uint64:
    """``2^k - 1`` as a uint64, the bit mask that reduces a uint64 modulo 2^k."""
    return np.uint64((1 << check_modulus_bits(modulus_bits)) - 1)


def reduce_(y: np.ndarray, modulus_bits: int) -> np.ndarray:
    """Reduce a uint64 array modulo 2^k in place and return it."""
    if modulus_bits < 64:
        np.bitwise_and(y, modulus_mask(modulus_bits), out=y)
    return y


def to_signed(y: np.ndarray, modulus_bits: int) -> np.ndarray:
    """The representatives in ``[-2^(k-1), 2^(k-1))`` of uint64 residues modulo 2^k, as int64."""
    y = check_residues(y, modulus_bits, name="sum")
    if modulus_bits == 64:
        return y.view(np.int64).copy()
    signed = y.astype(np.int64)
    half = 1 << (modulus_bits - 1)
    return np.where(signed >= half, signed - (1 << modulus_bits), signed)


def check_residues(y: np.ndarray, modulus_bits: int, name: str = "array") -> np.ndarray:
    """Check that ``y`` is a uint64 numpy array of residues in ``[0, 2^k)``; return it unchanged."""
    if not isinstance(y, np.ndarray) or y.dtype != np.uint64:
        got = y.dtype if isinstance(y, np.ndarray | torch.Tensor) else type(y).__name__
        raise TypeError(f"{name} must be a numpy uint64 array, got {got}")
    if modulus_bits < 64 and y.size and int(y.max()) >= (1 << modulus_bits):
        raise ValueError(f"{name} has values outside the modulus 2^{modulus_bits}")
    return y


def _check_sum_fits(max_abs: int, max_clients: int, modulus_bits: int) -> None:
    """Raise if ``max_clients`` values of magnitude ``max_abs`` could overflow the signed range."""
    limit = (1 << (modulus_bits - 1)) - 1
    if max_clients * max_abs > limit:
        raise OverflowError(
            f"a sum of {max_clients} values of magnitude up to {max_abs} can exceed 2^{modulus_bits - 1} - 1 "
            f"and wrap modulo 2^{modulus_bits}; lower the scale/bound or raise modulus_bits"
        )


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """A numpy view/copy of an array or tensor (torch tensors are detached and moved to CPU)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def pack_fields(values: np.ndarray, width: int, per_word: int) -> np.ndarray:
    """Non-negative integers (each ``< 2^width``) as uint64 words of ``per_word`` fields of ``width`` bits
    (field ``j`` of a word at bits ``[j·width, (j+1)·width)``; the last word zero padded)."""
    flat = np.asarray(values).reshape(-1)
    padded = np.zeros(-(-flat.size // per_word) * per_word, dtype=np.uint64)
    padded[: flat.size] = flat
    shifts = (np.arange(per_word, dtype=np.uint64) * np.uint64(width))[None, :]  # (1, per_word)
    return np.bitwise_or.reduce(padded.reshape(-1, per_word) << shifts, axis=1)


def unpack_fields(words: np.ndarray, count: int, width: int, per_word: int) -> np.ndarray:
    """The first ``count`` fields (uint64) of :func:`pack_fields` words (or of a sum that never carried)."""
    shifts = (np.arange(per_word, dtype=np.uint64) * np.uint64(width))[None, :]
    fields = (words[:, None] >> shifts) & np.uint64((1 << width) - 1)  # (words, per_word)
    return fields.reshape(-1)[:count]


def _clipped_copy(x: np.ndarray | torch.Tensor, clip: float) -> np.ndarray:
    """``x`` as a new float64 array clipped to ``[-clip, clip]``; raises on NaN or infinity."""
    values = np.array(_as_numpy(x), dtype=np.float64)  # always a copy
    if not np.isfinite(values).all():
        raise ValueError("cannot encode NaN or infinite values")
    num_clipped = int(np.count_nonzero(np.abs(values) > clip))
    if num_clipped:
        logger.warning("fixed-point encoding clipped %d of %d values to ±%g", num_clipped, values.size, clip)
        np.clip(values, -clip, clip, out=values)
    return values


def moment_clip(max_tokens: int, activation_bound: float) -> float:
    """Public bound on ``|Σ_t x_ti x_tj|`` (and ``Σ_t x_ti²``) over at most ``max_tokens`` tokens.

    With every activation public-bounded by ``|x| <= activation_bound``, each entry of a Wanda
    squared-norm sum or of a SparseGPT Gram sum is at most ``max_tokens · activation_bound²``.
    Both arguments must be public (configuration, not a client's measured values).
    """
    if max_tokens < 1 or not activation_bound > 0:
        raise ValueError("max_tokens must be >= 1 and activation_bound > 0")
    return float(max_tokens) * float(activation_bound) ** 2


class FixedPoint:
    """Fixed-point code of floats as integers modulo 2^k.

    ``encode`` clips each value to ``[-clip, clip]`` and maps it to ``rint(x · 2^scale_bits) mod 2^k``
    (two's complement). Clients' encodings are added modulo 2^k and ``decode_sum`` maps the sum back.

    Overflow: the constructor raises ``OverflowError`` unless
    ``max_clients · rint(clip · 2^scale_bits) <= 2^(k-1) - 1``, so any sum of up to ``max_clients``
    encodings decodes without wrap-around. ``for_bound`` picks the largest such ``scale_bits``.

    Error bound: rounding moves each value by at most half a unit, ``2^-(scale_bits+1)``, so for inputs
    inside ``[-clip, clip]`` (unclipped) and ``n`` summands, per element,

        |decode_sum(Σ_u encode(x_u), n) − Σ_u x_u| <= n · 2^-(scale_bits+1)  (+ float64 rounding),

    where the float64 term is the single rounding of the exact decoded integer to float64, at most
    ``2^-53 · |decoded|`` (zero while ``|Σ_u rint(x_u · 2^scale_bits)| <= 2^53``). The bound is tight:
    values at ``(2m + ½) · 2^-scale_bits`` all round down by exactly half a unit. Inputs beyond
    ``clip`` are additionally moved to ``±clip`` (a bias the caller controls through the public bound).
    """

    words_per_value = 1

    def encoded_length(self, size: int) -> int:
        """Words that encode ``size`` values."""
        return int(size)

    def __init__(self, scale_bits: int, clip: float, max_clients: int, modulus_bits: int = 64):
        check_modulus_bits(modulus_bits)
        if not isinstance(scale_bits, int) or abs(scale_bits) > 1000:
            raise ValueError(f"scale_bits must be an int in [-1000, 1000], got {scale_bits!r}")
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"clip must be a positive finite float, got {clip!r}")
        if max_clients < 1:
            raise ValueError(f"max_clients must be >= 1, got {max_clients}")
        self.scale_bits = scale_bits
        self.clip = float(clip)
        self.max_clients = int(max_clients)
        self.modulus_bits = modulus_bits
        # rint is monotone, so |rint(x·2^s)| <= rint(clip·2^s) for every |x| <= clip.
        scaled_clip = math.ldexp(self.clip, scale_bits)
        if not math.isfinite(scaled_clip):
            raise OverflowError(f"clip · 2^{scale_bits} is not a finite float")
        self.max_int = int(np.rint(scaled_clip))
        _check_sum_fits(self.max_int, self.max_clients, modulus_bits)

    @classmethod
    def for_bound(cls, clip: float, max_clients: int, modulus_bits: int = 64) -> FixedPoint:
        """The code with the finest scale (largest ``scale_bits``) that cannot overflow."""
        if not (math.isfinite(clip) and clip > 0) or max_clients < 1:
            raise ValueError("clip must be positive and finite, max_clients >= 1")
        limit = (1 << (check_modulus_bits(modulus_bits) - 1)) - 1

        def fits(scale_bits: int) -> bool:
            scaled = math.ldexp(clip, scale_bits)
            return math.isfinite(scaled) and max_clients * int(np.rint(scaled)) <= limit

        estimate = math.log2(limit) - math.log2(max_clients) - math.log2(clip)
        scale_bits = min(1000, max(-1000, math.floor(estimate)))
        while scale_bits < 1000 and fits(scale_bits + 1):
            scale_bits += 1
        while scale_bits > -1000 and not fits(scale_bits):
            scale_bits -= 1
        return cls(scale_bits, clip, max_clients, modulus_bits)

    def __repr__(self) -> str:
        return (
            f"FixedPoint(scale_bits={self.scale_bits}, clip={self.clip}, max_clients={self.max_clients}, "
            f"modulus_bits={self.modulus_bits})"
        )

    def error_bound(self, num_summands: int) -> float:
        """Worst-case rounding error ``n · 2^-(scale_bits+1)`` of a decoded sum of unclipped values."""
        return num_summands * math.ldexp(1.0, -(self.scale_bits + 1))

    def encode(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Clip to ``[-clip, clip]``, scale by ``2^scale_bits``, round, and reduce modulo 2^k (same shape)."""
        scaled = _clipped_copy(x, self.clip)  # float64 copy, never mutates x
        np.ldexp(scaled, self.scale_bits, out=scaled)
        np.rint(scaled, out=scaled)
        return reduce_(scaled.astype(np.int64).view(np.uint64), self.modulus_bits)

    def decode_sum(self, y: np.ndarray, num_summands: int) -> np.ndarray:
        """Decode a sum (mod 2^k) of ``num_summands`` encodings to float64."""
        if not 1 <= num_summands <= self.max_clients:
            raise ValueError(f"num_summands must be in [1, {self.max_clients}], got {num_summands}")
        return np.ldexp(to_signed(y, self.modulus_bits).astype(np.float64), -self.scale_bits)


class TwoLimbFixedPoint:
    """Fixed-point code with a high and a low part per value, for sums that must be exact to (nearly)
    float64 precision.

    A single word leaves ``2^-scale_bits`` resolution, set by the public clip; a value far below the clip
    keeps few significant bits. Here each clipped value ``x`` is split exactly (in float64) into
    ``x · 2^s = h + r`` with ``h = floor(x · 2^s)`` and ``r ∈ [0, 1)``; the high word is ``h`` (two's
    complement, as in :class:`FixedPoint` with ``s`` its finest overflow-free scale) and the low part is
    ``l = rint(r · 2^low_bits)``, ``0 <= l <= 2^low_bits``. The low parts travel ``low_per_word`` to a
    word, in fields of ``field_bits`` bits (field ``j`` of a word at bits ``[j·f, (j+1)·f)``):

    - ``low_per_word=1`` (2 words per value): ``field_bits = k - 1``, ``low_bits`` 59 with 8 sites;
    - ``low_per_word=2`` (1.5 words per value): ``field_bits = k // 2``, ``low_bits`` 28 with 8 sites.

    ``low_bits`` is the largest value for which ``max_clients`` low parts cannot reach ``2^field_bits``,
    so sums of up to ``max_clients`` encodings never carry out of a field or wrap. ``encode`` returns
    ``[high words, low words]`` and ``decode_sum = Σh · 2^-s + Σl · 2^-(s + low_bits)``.

    Error bound per element, for ``n`` summands within ``[-clip, clip]``:

        |decode_sum − Σ_u x_u| <= n · 2^-(s + low_bits + 1) + 2^-52 · (|decode_sum| + n · 2^-s),

    the first term from rounding ``r``, the second from the float64 arithmetic of the decoding.
    """

    def __init__(self, high: FixedPoint, low_per_word: int = 1):
        if low_per_word not in (1, 2):
            raise ValueError(f"low_per_word must be 1 or 2, got {low_per_word!r}")
        self.high = high
        self.scale_bits = high.scale_bits
        self.clip = high.clip
        self.max_clients = high.max_clients
        self.modulus_bits = high.modulus_bits
        self.low_per_word = low_per_word
        self.words_per_value = 1 + 1 / low_per_word
        # floor can reach -(max_int + 1): check the high words' sum for that magnitude
        _check_sum_fits(high.max_int + 1, high.max_clients, high.modulus_bits)
        self.field_bits = high.modulus_bits - 1 if low_per_word == 1 else high.modulus_bits // 2
        most = (1 << self.field_bits) - 1  # a field's sum must stay at or below this
        self.low_bits = min(62, (most // high.max_clients).bit_length() - 1)
        if self.low_bits < 1:
            raise OverflowError(f"a {self.field_bits}-bit field cannot hold {high.max_clients} low parts")

    @classmethod
    def for_bound(
        cls, clip: float, max_clients: int, modulus_bits: int = 64, low_per_word: int = 1
    ) -> TwoLimbFixedPoint:
        """The code whose high word has the finest overflow-free scale."""
        high = FixedPoint.for_bound(clip, max_clients, modulus_bits)
        try:
            return cls(high, low_per_word)
        except OverflowError:  # floor's extra unit did not fit: one bit coarser
            return cls(FixedPoint(high.scale_bits - 1, clip, max_clients, modulus_bits), low_per_word)

    def __repr__(self) -> str:
        return (
            f"TwoLimbFixedPoint(scale_bits={self.scale_bits}, low_bits={self.low_bits}, "
            f"low_per_word={self.low_per_word}, clip={self.clip})"
        )

    def encoded_length(self, size: int) -> int:
        """Words that encode ``size`` values: ``size`` high words and ``ceil(size / low_per_word)`` low."""
        return int(size) + -(-int(size) // self.low_per_word)

    def error_bound(self, num_summands: int, decoded: np.ndarray | float = 0.0) -> np.ndarray | float:
        """The worst-case error of a decoded sum (see the class docstring); ``decoded``: the decoded values."""
        rounding = num_summands * math.ldexp(1.0, -(self.scale_bits + self.low_bits + 1))
        arithmetic = 2.0**-52 * (np.abs(decoded) + num_summands * math.ldexp(1.0, -self.scale_bits))
        return rounding + arithmetic

    def encode(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """``[high words, low words]`` of the clipped values, modulo 2^k, ``(encoded_length(size),)``."""
        scaled = _clipped_copy(x, self.clip).reshape(-1)  # float64 copy, never mutates x
        size = scaled.size
        np.ldexp(scaled, self.scale_bits, out=scaled)  # exact (power of 2)
        words = np.zeros(self.encoded_length(size), dtype=np.int64)  # (high words | low words)
        high = np.floor(scaled)
        words[:size] = high
        np.subtract(scaled, high, out=scaled)  # exact, in [0, 1)
        np.ldexp(scaled, self.low_bits, out=scaled)
        np.rint(scaled, out=scaled)
        if self.low_per_word == 1:
            words[size:] = scaled
        else:
            low = scaled.astype(np.uint64)  # (size,) in [0, 2^low_bits]
            words[size:] = pack_fields(low, self.field_bits, self.low_per_word).view(np.int64)
        return reduce_(words.view(np.uint64), self.modulus_bits)

    def decode_sum(self, y: np.ndarray, num_summands: int) -> np.ndarray:
        """Decode a sum (mod 2^k) of ``num_summands`` encodings to float64, ``(size,)``."""
        if not 1 <= num_summands <= self.max_clients:
            raise ValueError(f"num_summands must be in [1, {self.max_clients}], got {num_summands}")
        size = (y.size * self.low_per_word) // (self.low_per_word + 1)
        if y.ndim != 1 or self.encoded_length(size) != y.size:
            raise ValueError(f"no number of values has an encoding of shape {y.shape}")
        y = check_residues(y, self.modulus_bits, name="sum")
        high = np.ldexp(to_signed(y[:size], self.modulus_bits).astype(np.float64), -self.scale_bits)
        low = unpack_fields(y[size:], size, self.field_bits, self.low_per_word).astype(np.float64)  # exact
        return high + np.ldexp(low, -(self.scale_bits + self.low_bits))


class IntegerCode:
    """Exact code of integers (token counts, mask votes) as residues modulo 2^k.

    ``encode`` requires ``|x| <= max_abs`` (raises otherwise; counts are never silently clipped) and the
    constructor raises ``OverflowError`` unless ``max_clients · max_abs <= 2^(k-1) - 1``, so decoded sums
    of up to ``max_clients`` encodings are exact.
    """

    def __init__(self, max_abs: int, max_clients: int, modulus_bits: int = 64):
        check_modulus_bits(modulus_bits)
        if max_abs < 1 or max_clients < 1:
            raise ValueError("max_abs and max_clients must be >= 1")
        self.max_abs = int(max_abs)
        self.max_clients = int(max_clients)
        self.modulus_bits = modulus_bits
        _check_sum_fits(self.max_abs, self.max_clients, modulus_bits)

    def encode(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Residues modulo 2^k of an integer or boolean array (same shape)."""
        values = _as_numpy(x)
        if values.dtype == np.bool_:
            values = values.astype(np.int64)
        if not np.issubdtype(values.dtype, np.integer):
            raise TypeError(f"IntegerCode encodes integer arrays, got {values.dtype}")
        if values.dtype == np.uint64 and values.size and int(values.max()) > self.max_abs:
            raise ValueError(f"integer values exceed the public bound max_abs={self.max_abs}")
        signed = values.astype(np.int64)
        if signed.size and (int(signed.min()) < -self.max_abs or int(signed.max()) > self.max_abs):
            raise ValueError(f"integer values exceed the public bound max_abs={self.max_abs}")
        return reduce_(signed.astype(np.uint64), self.modulus_bits)

    def decode_sum(self, y: np.ndarray, num_summands: int) -> np.ndarray:
        """Decode a sum (mod 2^k) of ``num_summands`` encodings to exact int64."""
        if not 1 <= num_summands <= self.max_clients:
            raise ValueError(f"num_summands must be in [1, {self.max_clients}], got {num_summands}")
        return to_signed(y, self.modulus_bits)
