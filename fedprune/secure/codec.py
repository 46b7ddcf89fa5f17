"""What a site adds into a secure sum: its payload as ONE vector of integers modulo 2^k, and back.

Mask votes
----------
A keep-mask is 0/1 per weight and the server needs the number of sites that kept each weight. With at
most ``n`` sites a count fits in ``w = ceil(log2(n + 1))`` bits, so ``k // w`` weights share one word
(field ``j`` of a word at bits ``[j·w, (j+1)·w)``). Adding words modulo 2^k never carries between fields
because each field's sum is at most ``n < 2^w``: the decoded counts are exact.

Statistics
----------
``fedprune.payload.encode_stats`` arrays (``total.<i>`` float64 slots, ``count``, ``index``) become
``[code(total.0), code(total.1), ..., IntegerCode(count)]`` with ``code`` a :class:`FixedPoint` (one word
per entry) or a :class:`TwoLimbFixedPoint` (1.5 or two words per entry, a high and a low part). The slot layout (``index``:
which layers share an input, an architectural fact) is public; the server decodes the sum back into the
same arrays and validates them with ``decode_stats``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from fedprune.secure.encoding import (
    FixedPoint,
    IntegerCode,
    TwoLimbFixedPoint,
    check_modulus_bits,
    pack_fields,
    unpack_fields,
)
from fedprune.stat_kinds import StatKind, get_stat_kind

logger = logging.getLogger(__name__)

ValueCode = FixedPoint | TwoLimbFixedPoint


def field_bits(max_sites: int) -> int:
    """Bits per vote count: ``ceil(log2(max_sites + 1))``."""
    if max_sites < 1:
        raise ValueError(f"max_sites must be >= 1, got {max_sites}")
    return max(1, math.ceil(math.log2(max_sites + 1)))


def packed_length(num_votes: int, max_sites: int, modulus_bits: int = 64) -> int:
    """Words needed for ``num_votes`` counts of up to ``max_sites`` each."""
    per_word = check_modulus_bits(modulus_bits) // field_bits(max_sites)
    if per_word < 1:
        raise ValueError(f"a {modulus_bits}-bit word cannot hold a count of up to {max_sites}")
    return -(-num_votes // per_word)


def pack_votes(keep: np.ndarray, max_sites: int, modulus_bits: int = 64) -> np.ndarray:
    """A flat 0/1 (bool) array as uint64 words of ``field_bits(max_sites)``-bit fields."""
    flat = np.asarray(keep).reshape(-1)
    if flat.dtype != np.bool_:
        raise TypeError(f"votes must be booleans, got {flat.dtype}")
    width = field_bits(max_sites)
    packed_length(flat.size, max_sites, modulus_bits)  # checks that a count fits a word
    return pack_fields(flat, width, modulus_bits // width)


def unpack_counts(words: np.ndarray, num_votes: int, max_sites: int, modulus_bits: int = 64) -> np.ndarray:
    """The per-weight counts (int64, ``(num_votes,)``) from a sum of :func:`pack_votes` words."""
    width = field_bits(max_sites)
    per_word = modulus_bits // width
    if words.shape != (packed_length(num_votes, max_sites, modulus_bits),):
        raise ValueError(f"expected {packed_length(num_votes, max_sites, modulus_bits)} words")
    return unpack_fields(words, num_votes, width, per_word).astype(np.int64)


def slot_sizes(kind: str | StatKind, index: Sequence[int], widths: Sequence[int]) -> list[int]:
    """Length of each statistics slot: the kind's ``wire_length`` (``n`` for sq_norm, ``n(n+1)/2`` for
    hessian) of its first layer's width ``n``.

    ``index[i]`` is the slot of layer ``i`` (layers sorted by name), ``widths[i]`` its input width.
    """
    spec = get_stat_kind(kind)
    sizes: dict[int, int] = {}
    for slot, n in zip(index, widths, strict=True):
        size = spec.wire_length(n)
        if sizes.setdefault(int(slot), size) != size:
            raise ValueError(f"layers of slot {slot} have different input widths")
    if sorted(sizes) != list(range(len(sizes))):
        raise ValueError(f"slot indices {sorted(sizes)} are not 0..{len(sizes) - 1}")
    return [sizes[i] for i in range(len(sizes))]


def stats_vector_length(sizes: Sequence[int], values: ValueCode) -> int:
    """Words of an encoded statistics payload: every slot (``values.encoded_length``), then one count
    per slot."""
    return sum(values.encoded_length(size) for size in sizes) + len(sizes)


def encode_stats_vector(arrays: dict[str, np.ndarray], values: ValueCode, counts: IntegerCode) -> np.ndarray:
    """``encode_stats`` arrays as one uint64 vector (the ``index`` array is not included: it is public)."""
    slots = len(arrays["count"])
    parts = [values.encode(arrays[f"total.{i}"]) for i in range(slots)]
    parts.append(counts.encode(arrays["count"]))
    return np.concatenate(parts)


def decode_stats_vector(
    total: np.ndarray, sizes: Sequence[int], values: ValueCode, counts: IntegerCode, num_summands: int
) -> dict[str, np.ndarray]:
    """The summed ``total.<i>`` (float64) and ``count`` (int64) arrays from a sum of encodings."""
    expected = stats_vector_length(sizes, values)
    if total.shape != (expected,):
        raise ValueError(f"sum has shape {total.shape}, expected ({expected},)")
    out = {}
    start = 0
    for i, size in enumerate(sizes):
        words = values.encoded_length(size)
        out[f"total.{i}"] = values.decode_sum(total[start : start + words], num_summands)
        start += words
    out["count"] = counts.decode_sum(total[start:], num_summands)
    return out
