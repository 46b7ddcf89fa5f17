"""Pruners behind a registry: importing this package registers magnitude, wanda, sparsegpt, admm, variance, obs and gatenorm."""

from fedprune.pruners import admm, gatenorm, magnitude, obs, sparsegpt, variance, wanda  # noqa: F401  (registration)
from fedprune.pruners.base import (
    PRUNERS,
    Pruner,
    PruneResult,
    check_pruner_supports,
    get_pruner,
    register_pruner,
)

__all__ = [
    "PRUNERS",
    "PruneResult",
    "Pruner",
    "check_pruner_supports",
    "get_pruner",
    "register_pruner",
]
