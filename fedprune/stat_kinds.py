"""Statistic kinds as objects: each kind owns its computation, shape, wire layout, checks and DP facts.

``SQ_NORM`` (Wanda): Σ_t x_tj², shape ``(in,)``; on the wire the vector itself.
``HESSIAN`` (SparseGPT/OBS): Σ_t x_t x_tᵀ, shape ``(in, in)``; on the wire its upper triangle, row-major.

Besides :meth:`StatKind.invalid_reason` (any decoded sum), a kind judges one site's sum in the clear:
:meth:`StatKind.site_reason` (never possible for honest data; always applied), :meth:`StatKind.psd_reason`
and :meth:`StatKind.token_scale` (``federation.robust``, :mod:`fedprune.aggregation.site_checks`).

Everything else (``fedprune.stats``, ``fedprune.payload``, ``fedprune.secure``, the server) asks the kind
object, found by name in :data:`STAT_KINDS` (:func:`get_stat_kind`), instead of branching on its name.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np
import torch

from fedprune.cpu_gram import GROUP, gram_upper_add_bf16_, native_gram_available

GRAM_TILE = 128  # rows per strip: only the strips' parts on and above the diagonal are multiplied
# (128 rows: about 0.9x the CPU time of 256 at width 576, 0.97-1.02x at 1536, bit-identical sums;
# python experiments/probes/gram_sum_timing.py)
# A site's Gram sum passes as PSD when its smallest eigenvalue is >= -PSD_TOL · its trace: honest sums of
# float32 products, singular ones included, stay above -1e-8 · trace; any sum that passes is made positive
# definite by SparseGPT's damping (1% of the mean diagonal, >= PSD_TOL · trace up to 10,000 inputs).
PSD_TOL = 1e-6
CAUCHY_SCHWARZ_TOL = 1e-3  # relative slack of (Σx)² <= count · Σx² for float32 partial sums


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself if float32 or wider, else exactly upcast to float32 (bfloat16 and float16 inputs:
    their products and sums are then as exact as a float32 model's)."""
    return x if torch.finfo(x.dtype).bits >= 32 else x.float()


def _windows(x: torch.Tensor) -> torch.Tensor:
    """View layer inputs as ``(windows, tokens, in_features)``, in their dtype."""
    if x.dim() == 2:
        return x.unsqueeze(0)
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def _as_windows(x: torch.Tensor) -> torch.Tensor:
    """View layer inputs as ``(windows, tokens, in_features)``, at least float32."""
    return _windows(at_least_float32(x))


def sq_norm_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ over tokens of x², per input feature. ``x``: ``(..., tokens, in)`` -> ``(in,)`` float64."""
    xw = _as_windows(x.detach())  # (windows, tokens, in)
    return xw.pow(2).sum(dim=1).double().sum(dim=0)


def gram_sum(x: torch.Tensor, tile: int = GRAM_TILE) -> torch.Tensor:
    """Σ over tokens of x xᵀ. ``x``: ``(..., tokens, in)`` -> ``(in, in)`` float64.

    Each window's product is a float32 (or the input's wider dtype) matrix product, summed over windows in
    float64, so the result does not depend on how windows are grouped into batches or sites (bfloat16
    inputs: float32 sums of exact products from :mod:`fedprune.cpu_gram` where available). The Gram
    matrix is symmetric: it is computed in strips of ``tile`` rows from the diagonal to the right edge,
    one batched product over the windows per strip (about half the multiply-adds of the full product,
    in a few large GEMMs: small per-tile products scale badly with threads on a busy machine).
    """
    n = x.shape[-1]
    return gram_mirror_(gram_upper_add_(torch.zeros(n, n, dtype=torch.float64), x, tile), tile)


def gram_upper_add_(total: torch.Tensor, x: torch.Tensor, tile: int = GRAM_TILE) -> torch.Tensor:
    """Add Σ over tokens of x xᵀ to ``total`` ``(in, in)`` float64 in place, on and above the diagonal
    strips only (rows ``i..i+tile``, columns ``i..in``; the rest is left as it was); returns ``total``.
    Several calls, then one :func:`gram_mirror_`, equal the sum of their :func:`gram_sum` bit for bit."""
    n = x.shape[-1]
    if tuple(total.shape) != (n, n) or total.dtype != torch.float64:
        raise ValueError(
            f"a Gram sum of width {n} needs a float64 ({n}, {n}) total, got {tuple(total.shape)}"
        )
    if x.dtype is torch.bfloat16 and tile % GROUP == 0 and total.is_contiguous() and native_gram_available():
        return gram_upper_add_bf16_(total, _windows(x.detach()), tile)  # (windows, tokens, in) bfloat16
    xw = _as_windows(x.detach())  # (windows, tokens, in)
    for i in range(0, n, tile):
        rows = xw[:, :, i : i + tile].transpose(1, 2)  # (windows, strip, tokens)
        total[i : i + rows.shape[1], i:] += torch.bmm(rows, xw[:, :, i:]).double().sum(dim=0)  # cols i..n
    return total


def gram_mirror_(total: torch.Tensor, tile: int = GRAM_TILE) -> torch.Tensor:
    """Fill what :func:`gram_upper_add_` leaves (below the diagonal strips) from its transpose; returns
    ``total``."""
    n = total.shape[0]
    for i in range(0, n, tile):
        width = min(tile, n - i)
        total[i + width :, i : i + width] = total[i : i + width, i + width :].t()
    return total


def triu_of(matrix: torch.Tensor) -> torch.Tensor:
    """Upper triangle (with diagonal) of a symmetric ``(n, n)`` matrix, row-major, ``(n(n+1)/2,)``."""
    n = matrix.shape[0]
    rows, cols = torch.triu_indices(n, n)
    return matrix[rows, cols]


def symmetric_from_triu(values: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`triu_of`: ``(n(n+1)/2,)`` -> symmetric ``(n, n)``."""
    rows, cols = torch.triu_indices(n, n)
    matrix = torch.zeros(n, n, dtype=values.dtype)
    matrix[rows, cols] = values
    matrix[cols, rows] = values
    return matrix


def psd_project(matrix: torch.Tensor) -> torch.Tensor:
    """The nearest (Frobenius) positive semi-definite matrix to a symmetric one: negative eigenvalues -> 0.

    Post-processing of a noisy Gram sum (costs no privacy), so that SparseGPT's Cholesky succeeds.
    """
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0)) @ vectors.T


def replace_one_sensitivity(seq_len: int, bound: float) -> float:
    """``√2 · seq_len · bound²``: the L2 change of a sum of non-negative vectors (or PSD matrices) when one
    window of ``seq_len`` tokens, each of norm at most ``bound`` and contributing norm at most ``bound²``,
    is replaced (``‖a − b‖² <= ‖a‖² + ‖b‖²`` since ``⟨a, b⟩ >= 0``)."""
    return math.sqrt(2.0) * seq_len * bound**2


class StatKind(ABC):
    """One kind of summed statistic of a layer's inputs: a float64 sum over tokens (plus a token count)."""

    name: str

    def __repr__(self) -> str:
        return f"StatKind({self.name!r})"

    @abstractmethod
    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the tokens of ``x`` ``(..., tokens, in)``: float64 of :meth:`shape` ``(in)``."""

    def accumulate_(self, total: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """``total`` (``None``: nothing yet) plus the sum over the tokens of ``x``, in place where possible;
        after the last call :meth:`finish_` makes it the sum. Equal to adding :meth:`compute` of each ``x``
        bit for bit, without a new sum per batch."""
        part = self.compute(x)
        return part if total is None else total.add_(part)

    def finish_(self, total: torch.Tensor) -> torch.Tensor:
        """The sum that :meth:`accumulate_` calls built (here ``total`` itself)."""
        return total

    @abstractmethod
    def shape(self, in_features: int) -> tuple[int, ...]:
        """Shape of the sum for inputs of width ``in_features``."""

    @abstractmethod
    def wire_length(self, in_features: int) -> int:
        """Number of float64 values the sum takes on the wire."""

    @abstractmethod
    def to_wire(self, total: torch.Tensor) -> torch.Tensor:
        """The sum as flat float64 values, ``(wire_length(in),)``."""

    @abstractmethod
    def from_wire(self, values: torch.Tensor, in_features: int) -> torch.Tensor:
        """Inverse of :meth:`to_wire`; ValueError if ``values`` is not ``(wire_length(in),)``."""

    def invalid_reason(self, total: torch.Tensor) -> str | None:
        """Why a decoded sum is impossible for this kind (``None`` if it is possible)."""
        if not torch.isfinite(total).all():
            return "contains NaN or Inf"
        return None

    def window_sensitivity(self, seq_len: int, bound: float) -> float:
        """L2 change of the sum when one window of ``seq_len`` tokens (clipped to L2 norm ``bound``) is
        replaced by another, as it travels (:meth:`to_wire`)."""
        return replace_one_sensitivity(seq_len, bound)

    def site_reason(self, total: torch.Tensor, count: int) -> str | None:
        """Why one site's valid sum over ``count`` tokens cannot come from any data (``None``: it can);
        cheap checks beyond :meth:`invalid_reason`, for sums in the clear (no DP noise)."""
        return None

    def psd_reason(self, total: torch.Tensor) -> str | None:
        """Why one site's sum is not positive semi-definite, as every honest one is (``None``: it is, or
        the kind is no matrix); costlier than :meth:`site_reason`."""
        return None

    def token_scale(self, total: torch.Tensor, count: int) -> float:
        """The sum's size per token, to compare sites (the built-in kinds: the mean squared norm of the
        layer inputs, Σ_t ‖x_t‖² / count; by default the sum of the entries' magnitudes / count)."""
        return float(total.abs().sum()) / count

    @abstractmethod
    def project_noisy(self, total: torch.Tensor) -> torch.Tensor:
        """The nearest possible sum to a noisy one (post-processing: costs no privacy)."""

    def _check_wire(self, values: torch.Tensor, in_features: int) -> None:
        expected = (self.wire_length(in_features),)
        if tuple(values.shape) != expected:
            raise ValueError(f"{self.name}: wire length {tuple(values.shape)}, expected {expected}")


class SqNormKind(StatKind):
    """Σ_t x_tj² per input feature (Wanda). ``‖x²‖₂ <= ‖x‖²`` and the sums are non-negative."""

    name = "sq_norm"

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return sq_norm_sum(x)  # (in,)

    def shape(self, in_features: int) -> tuple[int, ...]:
        return (in_features,)

    def wire_length(self, in_features: int) -> int:
        return in_features

    def to_wire(self, total: torch.Tensor) -> torch.Tensor:
        return total  # (in,) as is

    def from_wire(self, values: torch.Tensor, in_features: int) -> torch.Tensor:
        self._check_wire(values, in_features)
        return values

    def invalid_reason(self, total: torch.Tensor) -> str | None:
        if total.dim() != 1:
            return f"shape {tuple(total.shape)} is not a vector"
        if (reason := super().invalid_reason(total)) is not None:
            return reason
        return "negative sum of squares" if (total < 0).any() else None

    def token_scale(self, total: torch.Tensor, count: int) -> float:
        return float(total.sum()) / count

    def project_noisy(self, total: torch.Tensor) -> torch.Tensor:
        """Negative sums of squares -> 0 (``np.maximum``: also -0.0 -> +0.0)."""
        return torch.from_numpy(np.maximum(total.numpy(), 0.0))


class HessianKind(StatKind):
    """Σ_t x_t x_tᵀ (SparseGPT/OBS; H = 2·Σ/count). ``‖x xᵀ‖_F = ‖x‖²``; the triangle that travels has
    at most the Frobenius norm of the matrix; the sums are positive semi-definite."""

    name = "hessian"

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return gram_sum(x)  # (in, in)

    def accumulate_(self, total: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """The upper strips only (:func:`gram_upper_add_`); :meth:`finish_` mirrors them once."""
        n = x.shape[-1]
        return gram_upper_add_(torch.zeros(n, n, dtype=torch.float64) if total is None else total, x)

    def finish_(self, total: torch.Tensor) -> torch.Tensor:
        return gram_mirror_(total)

    def shape(self, in_features: int) -> tuple[int, ...]:
        return (in_features, in_features)

    def wire_length(self, in_features: int) -> int:
        return in_features * (in_features + 1) // 2

    def to_wire(self, total: torch.Tensor) -> torch.Tensor:
        return triu_of(total)  # (in(in+1)/2,)

    def from_wire(self, values: torch.Tensor, in_features: int) -> torch.Tensor:
        self._check_wire(values, in_features)
        return symmetric_from_triu(values, in_features)

    def invalid_reason(self, total: torch.Tensor) -> str | None:
        if total.dim() != 2 or total.shape[0] != total.shape[1]:
            return f"shape {tuple(total.shape)} is not a square matrix"
        return super().invalid_reason(total)

    def site_reason(self, total: torch.Tensor, count: int) -> str | None:
        """A negative diagonal entry: a negative sum of squares."""
        diagonal = total.diagonal()
        if (diagonal < 0).any():
            return f"negative diagonal entry {float(diagonal.min()):.3g} (a sum of squares)"
        return None

    def psd_reason(self, total: torch.Tensor) -> str | None:
        """Smallest eigenvalue below ``-PSD_TOL · trace``: a Cholesky factorisation of the float64 matrix
        shifted by ``PSD_TOL · trace`` fails (about a tenth of the cost of ``eigvalsh``, which only a
        rejected site pays, for the reason's numbers)."""
        matrix = total.double()
        trace = float(matrix.diagonal().sum())
        if trace <= 0:  # no input at all (a non-negative diagonal summing to 0): PSD only if all zero
            return "off-diagonal entries with an all-zero diagonal" if matrix.any() else None
        shift = PSD_TOL * trace * torch.eye(matrix.shape[0], dtype=torch.float64)
        if int(torch.linalg.cholesky_ex(matrix + shift).info) == 0:
            return None
        values = torch.linalg.eigvalsh(matrix)
        return (
            f"not positive semi-definite: smallest eigenvalue {float(values[0]):.3g}, largest "
            f"{float(values[-1]):.3g}, trace {trace:.3g} (tolerance {PSD_TOL:g} x trace)"
        )

    def token_scale(self, total: torch.Tensor, count: int) -> float:
        return float(self.inputs_part(total).diagonal().sum()) / count

    def inputs_part(self, total: torch.Tensor) -> torch.Tensor:
        """The block of the sum over the layer inputs themselves (here the whole matrix)."""
        return total

    def project_noisy(self, total: torch.Tensor) -> torch.Tensor:
        """The nearest positive semi-definite matrix (:func:`psd_project`)."""
        return psd_project(total)


def moment_sums(x: torch.Tensor) -> torch.Tensor:
    """Σ over tokens of x and of x², per input feature: ``(..., tokens, in)`` -> ``(2, in)`` float64."""
    xw = _as_windows(x.detach())  # (windows, tokens, in)
    return torch.stack([xw.sum(dim=1).double().sum(dim=0), xw.pow(2).sum(dim=1).double().sum(dim=0)])


class MomentsKind(StatKind):
    """Σ_t x_tj and Σ_t x_tj² per input feature (means and variances of activations: structured
    ``variance`` pruning and its mean compensation); on the wire the two rows, ``(2 in,)``."""

    name = "moments"

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return moment_sums(x)  # (2, in)

    def shape(self, in_features: int) -> tuple[int, ...]:
        return (2, in_features)

    def wire_length(self, in_features: int) -> int:
        return 2 * in_features

    def to_wire(self, total: torch.Tensor) -> torch.Tensor:
        return total.reshape(-1)  # (2 in,): Σx then Σx²

    def from_wire(self, values: torch.Tensor, in_features: int) -> torch.Tensor:
        self._check_wire(values, in_features)
        return values.reshape(2, in_features)

    def invalid_reason(self, total: torch.Tensor) -> str | None:
        if total.dim() != 2 or total.shape[0] != 2:
            return f"shape {tuple(total.shape)} is not (2, in)"
        if (reason := super().invalid_reason(total)) is not None:
            return reason
        return "negative sum of squares" if (total[1] < 0).any() else None

    def site_reason(self, total: torch.Tensor, count: int) -> str | None:
        """Σx and Σx² of one feature that no ``count`` numbers have: (Σx)² > count · Σx² (Cauchy-Schwarz)."""
        excess = total[0].pow(2) - count * total[1] * (1.0 + CAUCHY_SCHWARZ_TOL)
        if (excess > 0).any():
            feature = int(excess.argmax())
            return f"(Σx)² > count · Σx² for input feature {feature} (no {count} numbers have these sums)"
        return None

    def token_scale(self, total: torch.Tensor, count: int) -> float:
        return float(total[1].sum()) / count

    def window_sensitivity(self, seq_len: int, bound: float) -> float:
        """Replacing one window moves Σx by at most ``2 · seq_len · bound`` (any signs) and Σx² by at
        most ``√2 · seq_len · bound²`` (non-negative); the two parts add in quadrature."""
        return math.hypot(2.0 * seq_len * bound, replace_one_sensitivity(seq_len, bound))

    def project_noisy(self, total: torch.Tensor) -> torch.Tensor:
        """Negative sums of squares -> 0."""
        return torch.stack([total[0], torch.from_numpy(np.maximum(total[1].numpy(), 0.0))])


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    """Layer inputs as windows with a constant 1 appended: ``(windows, tokens, in + 1)``."""
    xw = _as_windows(x.detach())  # (windows, tokens, in)
    return torch.cat([xw, xw.new_ones(*xw.shape[:-1], 1)], dim=-1)


class AffineHessianKind(HessianKind):
    """Σ_t [x_t; 1][x_t; 1]ᵀ: the Gram matrix of the inputs with a constant 1 appended, ``(in+1, in+1)``,
    so it holds Σxxᵀ, Σx and the count (an affine least-squares fit: weights and a bias); on the wire its
    upper triangle. Each token's augmented vector has squared norm at most ``bound² + 1``."""

    name = "affine_hessian"

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return gram_sum(_with_ones(x))  # (in+1, in+1)

    def accumulate_(self, total: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        return super().accumulate_(total, _with_ones(x))

    def shape(self, in_features: int) -> tuple[int, ...]:
        return (in_features + 1, in_features + 1)

    def wire_length(self, in_features: int) -> int:
        return (in_features + 1) * (in_features + 2) // 2

    def from_wire(self, values: torch.Tensor, in_features: int) -> torch.Tensor:
        self._check_wire(values, in_features)
        return symmetric_from_triu(values, in_features + 1)

    def site_reason(self, total: torch.Tensor, count: int) -> str | None:
        """A negative diagonal entry, or a constant entry Σ1·1 that is not the token count."""
        if (reason := super().site_reason(total, count)) is not None:
            return reason
        ones = float(total[-1, -1])
        if abs(ones - count) > 1e-9 * count:
            return f"constant entry {ones:.6g} is not the token count {count}"
        return None

    def inputs_part(self, total: torch.Tensor) -> torch.Tensor:
        """Σxxᵀ: the sum without the appended constant's row and column."""
        return total[:-1, :-1]

    def window_sensitivity(self, seq_len: int, bound: float) -> float:
        return math.sqrt(2.0) * seq_len * (bound**2 + 1.0)


SQ_NORM = SqNormKind()
HESSIAN = HessianKind()
MOMENTS = MomentsKind()
AFFINE_HESSIAN = AffineHessianKind()
STAT_KINDS: dict[str, StatKind] = {kind.name: kind for kind in (SQ_NORM, HESSIAN, MOMENTS, AFFINE_HESSIAN)}


def get_stat_kind(kind: str | StatKind) -> StatKind:
    """The registered kind object for a name (or the object itself); KeyError naming the known kinds."""
    if isinstance(kind, StatKind):
        return kind
    if kind not in STAT_KINDS:
        raise KeyError(f"unknown statistic {kind!r}; known: {sorted(STAT_KINDS)}")
    return STAT_KINDS[kind]
