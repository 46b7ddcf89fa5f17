"""ADMM weight reconstruction with gradual mask selection (Boža 2024, "Fast and Effective Weight Update
for Pruned Large Language Models").

The layer problem, per output row: minimise (w − w₀)ᵀ H (w − w₀) over weights w with the pruned entries
zero, H = Σxxᵀ (+ dampening). ADMM splits it into a ridge solve (W-step, one precomputed inverse) and a
projection onto the mask (Z-step). Gradual mask selection raises the sparsity over the first
``gradual`` iterations along a cubic schedule, choosing each step's mask from |W + U|, so weights that
the reconstruction moves can still swap in and out of the mask.

Steps, each its own function: normalisation of the inputs to unit Σx² (the magnitudes are then Wanda
scores and one ``rho`` suits every layer); the damped, normalised Gram matrix; the cubic sparsity
schedule; the mask of one step; the ADMM iterations. Only Σxxᵀ is needed: the same summed statistic as
SparseGPT, so ``stats_sync`` and ``privacy=secagg`` carry it unchanged.
"""

from __future__ import annotations

import logging

import torch

from fedprune.masks import Pattern, select_mask, select_nm
from fedprune.pruners.base import LastStatsCache, PruneResult, register_pruner, require_stats
from fedprune.pruners.wanda import wanda_scores
from fedprune.stat_kinds import HESSIAN
from fedprune.stats import Stats

logger = logging.getLogger(__name__)


def input_norms(gram: torch.Tensor) -> torch.Tensor:
    """‖x_j‖ = sqrt(Σx_j²) per input, with 1 for dead inputs (never active), ``(in,)`` float64."""
    norms = torch.diagonal(gram).to(torch.float64).clamp(min=0).sqrt()
    return torch.where(norms > 0, norms, torch.ones_like(norms))


def normalized_damped_gram(gram: torch.Tensor, norms: torch.Tensor, percdamp: float) -> torch.Tensor:
    """D⁻¹ G D⁻¹ + percdamp · mean(diag) · I with D = diag(norms), ``(in, in)`` float64; dead inputs
    get a unit diagonal (their weights are zeroed and stay zero)."""
    h = gram.to(torch.float64) / norms.reshape(-1, 1) / norms.reshape(1, -1)
    diag = torch.arange(h.shape[0])
    dead = torch.diagonal(gram) <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[diag[dead], diag[dead]] = 1.0
    h[diag, diag] += percdamp * torch.mean(torch.diagonal(h))
    return h


def ridge_inverse(h: torch.Tensor, rho: float) -> torch.Tensor:
    """(H + ρI)⁻¹, the W-step's one factorisation, ``(in, in)`` float32 (inverted in float64)."""
    eye = torch.eye(h.shape[0], dtype=torch.float64)
    return torch.linalg.inv(h.to(torch.float64) + rho * eye).to(torch.float32)


def gradual_sparsity(step: int, steps: int, sparsity: float) -> float:
    """The cubic schedule s·(1 − (1 − (step+1)/steps)³): rises fast, flattens, reaches ``sparsity``
    at ``step = steps − 1``."""
    if steps <= 0 or step >= steps - 1:
        return sparsity
    return sparsity * (1.0 - (1.0 - (step + 1) / steps) ** 3)


def lowest_pruned(magnitude: torch.Tensor, sparsity: float, group: str) -> torch.Tensor:
    """Keep-mask pruning the ``int(n · sparsity)`` lowest of each row (``row``) or of the whole matrix
    (``layer``), exact count; topk (deterministic on CPU) instead of a full sort: it runs at every step."""
    flat = magnitude.reshape(1, -1) if group == "layer" else magnitude
    num_pruned = int(flat.shape[1] * sparsity)
    keep = torch.ones_like(flat, dtype=torch.bool)
    if num_pruned:
        lowest = torch.topk(flat, num_pruned, dim=1, largest=False, sorted=False).indices
        keep.scatter_(1, lowest, False)
    return keep.reshape(magnitude.shape)


def step_mask(
    v: torch.Tensor, sparsity: float, final_sparsity: float, pattern: Pattern, group: str
) -> torch.Tensor:
    """Keep-mask of one ADMM step from the magnitudes of ``v = W + U`` ``(out, in)``: the lowest
    ``sparsity`` within each ``group``; for N:M the pattern's N largest of every M are always kept and
    the rest pruned lowest first up to ``sparsity``, so the final step (``sparsity = final_sparsity``,
    the pattern's own) is exactly N:M."""
    magnitude = v.abs()
    if pattern.kind != "nm":
        return lowest_pruned(magnitude, sparsity, group)
    protected = select_nm(magnitude, pattern.n, pattern.m)
    if sparsity >= final_sparsity:
        return protected
    return lowest_pruned(magnitude.masked_fill(protected, torch.inf), sparsity, group)


def admm_reconstruct(
    weight: torch.Tensor,
    h: torch.Tensor,
    inverse: torch.Tensor,
    mask: torch.Tensor | None,
    sparsity: float,
    pattern: Pattern,
    iterations: int,
    gradual: int,
    rho: float,
    group: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ADMM on min tr((W − W₀) H (W − W₀)ᵀ) s.t. W = 0 off the mask (scaled form: W-, Z-, U-steps).

    Parameters
    ----------
    weight : ``(out, in)`` the dense W₀ (not mutated).
    h : ``(in, in)`` symmetric positive definite H (float64).
    inverse : ``(in, in)`` (H + ρI)⁻¹ (:func:`ridge_inverse`).
    mask : ``(out, in)`` a fixed keep-mask, or None to select it gradually over the first ``gradual``
        iterations (then fixed).
    Returns the sparse Z ``(out, in)`` float32 and its keep-mask.
    """
    w0 = weight.to(torch.float32)
    inverse = inverse.to(torch.float32)
    # W₀H(H + ρI)⁻¹ = W₀ − ρW₀(H + ρI)⁻¹: the W-step's fixed part, one matmul for all iterations
    fixed = torch.addmm(w0, w0, inverse, alpha=-rho)  # (out, in)
    w, u = w0, torch.zeros_like(w0)
    final = pattern.sparsity if pattern.kind == "nm" else sparsity
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if mask is None and gradual == 0:  # no schedule: the mask of the dense weights, fixed
        mask = step_mask(w0, final, final, pattern, group)
    for step in range(iterations):
        v = w + u
        if step < gradual:
            mask = step_mask(v, gradual_sparsity(step, gradual, final), final, pattern, group)
        # Z = V ⊙ mask and U + W − Z = V ⊙ ¬mask, so Z − U = ±V; then W (H + ρI) = W₀H + ρ(Z − U)
        u = v.masked_fill(mask, 0.0)
        w = torch.addmm(fixed, torch.where(mask, v, -v), inverse, alpha=rho)
    if gradual > iterations:  # the schedule did not finish: the final mask from the last iterate
        mask = step_mask(w + u, final, final, pattern, group)
    return (w + u) * mask, mask


@register_pruner
class AdmmPruner:
    """ADMM reconstruction from Σxxᵀ: ``iterations`` ADMM steps with penalty ``rho`` (on inputs
    normalised to unit Σx²), the mask chosen gradually over the first ``gradual`` (0: the Wanda mask of
    the dense weights, fixed), dampening ``percdamp`` of mean(diag), unstructured masks compared within
    ``group`` (``row`` or ``layer``)."""

    name = "admm"
    stat_kind = HESSIAN.name
    patterns = ("unstructured", "nm")
    updates_weights = True

    def __init__(
        self,
        iterations: int = 20,
        gradual: int = 15,
        rho: float = 1.0,
        percdamp: float = 0.1,
        group: str = "row",
    ) -> None:
        if int(iterations) < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        if not 0 <= int(gradual) <= int(iterations):
            raise ValueError(f"gradual must be in [0, iterations={iterations}], got {gradual}")
        if not float(rho) > 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        if not float(percdamp) >= 0:
            raise ValueError(f"percdamp must be >= 0, got {percdamp}")
        if group not in ("row", "layer"):
            raise ValueError(f"group must be 'row' or 'layer', got {group!r}")
        self.iterations, self.gradual = int(iterations), int(gradual)
        self.rho, self.percdamp, self.group = float(rho), float(percdamp), group
        self._problems: LastStatsCache[tuple[torch.Tensor, ...]] = LastStatsCache()

    def _problem(self, stats: Stats) -> tuple[torch.Tensor, ...]:
        """(norms, damped normalised H, (H + ρI)⁻¹) of one Stats object, computed once for the layers
        sharing it."""

        def compute(s: Stats) -> tuple[torch.Tensor, ...]:
            norms = input_norms(s.total)
            h = normalized_damped_gram(s.total, norms, self.percdamp)
            return norms, h, ridge_inverse(h, self.rho)

        return self._problems.get(stats, compute)

    def scores(self, weight: torch.Tensor, stats: Stats | None) -> torch.Tensor:
        """|W|·‖x‖ (Wanda's score, the first mask of the schedule), ``(out, in)``."""
        return wanda_scores(weight, torch.diagonal(require_stats(self, stats).total))

    def prune(
        self, weight: torch.Tensor, stats: Stats | None, sparsity: float, pattern: Pattern
    ) -> PruneResult:
        norms, h, inverse = self._problem(require_stats(self, stats))
        dead = torch.diagonal(stats.total) <= 0
        scaled = weight.to(torch.float32) * norms.to(torch.float32).reshape(1, -1)  # (out, in)
        scaled[:, dead] = 0.0
        mask = None
        if self.gradual == 0:
            mask = select_mask(scaled.abs(), sparsity, pattern, self.group)
        z, keep = admm_reconstruct(
            scaled, h, inverse, mask, sparsity, pattern, self.iterations, self.gradual, self.rho, self.group
        )
        new_weight = z / norms.to(torch.float32).reshape(1, -1)
        return PruneResult(weight=new_weight.to(weight.dtype), mask=keep)
