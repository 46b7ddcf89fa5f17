"""scikit-learn's bundled digits (8x8 images, no download), a held-out test split and Dirichlet label skew."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

NUM_CLASSES = 10
PIXEL_MAX = 16.0  # digits pixels are integers 0..16


@dataclass(frozen=True)
class DigitsSplit:
    """Flattened digits images in [0, 1] and labels, split into train (for clients) and held-out test."""

    x_train: torch.Tensor  # (train, 64) float32
    y_train: torch.Tensor  # (train,) int64
    x_test: torch.Tensor  # (test, 64) float32
    y_test: torch.Tensor  # (test,) int64


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as ``(x, y)``: ``x`` ``(1797, 64)`` float32 in [0, 1], ``y`` ``(1797,)`` int64."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32) / PIXEL_MAX  # (1797, 64)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)  # (1797,)
    return x, y


def split_indices(num_samples: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random ``(train_indices, test_indices)``, each sorted; test has ``round(fraction * n)`` rows."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(num_samples, generator=generator)  # (num_samples,)
    num_test = round(test_fraction * num_samples)
    return permutation[num_test:].sort().values, permutation[:num_test].sort().values


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> DigitsSplit:
    """Digits with a fixed seeded held-out test split that no client sees."""
    x, y = load_digits_tensors()
    train, test = split_indices(x.shape[0], test_fraction, seed)
    return DigitsSplit(x[train], y[train], x[test], y[test])


def _dirichlet_split_once(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """One draw: each class's shuffled indices are cut by proportions ~ Dirichlet(alpha * 1)."""
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        proportions = rng.dirichlet(np.full(num_clients, alpha))  # (num_clients,)
        cuts = (np.cumsum(proportions)[:-1] * members.size).astype(np.int64)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].append(chunk)
    return [np.sort(np.concatenate(chunks)) for chunks in parts]


def dirichlet_label_partition(
    labels: torch.Tensor,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
    max_attempts: int = 1000,
) -> list[torch.Tensor]:
    """Label-skewed split: for every class, client shares are drawn from ``Dirichlet(alpha)``.

    The standard scheme (Hsu et al. 2019): each class's indices are shuffled and cut in proportions
    drawn independently per class from a symmetric Dirichlet; the whole draw is repeated (same seeded
    stream) until every client holds at least ``min_size`` samples. Small ``alpha`` gives each client
    few classes, large ``alpha`` approaches IID.

    Returns
    -------
    list[torch.Tensor]
        ``num_clients`` sorted int64 index tensors, disjoint and together covering every index once.

    Raises
    ------
    ValueError
        On bad arguments, or if no draw within ``max_attempts`` meets ``min_size``.
    """
    if num_clients < 1 or alpha <= 0.0 or min_size < 0:
        raise ValueError(
            f"need num_clients >= 1, alpha > 0, min_size >= 0; got {num_clients}, {alpha}, {min_size}"
        )
    labels_np = labels.detach().cpu().numpy()
    if min_size * num_clients > labels_np.size:
        raise ValueError(f"{labels_np.size} samples cannot give {num_clients} clients {min_size} each")
    rng = np.random.default_rng(seed)
    for attempt in range(1, max_attempts + 1):
        parts = _dirichlet_split_once(labels_np, num_clients, alpha, rng)
        if min(part.size for part in parts) >= min_size:
            logger.debug("dirichlet partition met min_size=%d after %d draw(s)", min_size, attempt)
            return [torch.as_tensor(part, dtype=torch.int64) for part in parts]
    raise ValueError(f"no Dirichlet(alpha={alpha}) draw gave every client >= {min_size} samples")


def label_histogram(labels: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Count of each class in ``labels``: ``(num_classes,)`` int64."""
    return torch.bincount(labels, minlength=num_classes)
