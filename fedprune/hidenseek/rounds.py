"""One HideNseek round as client and server steps, and an in-process loop (no Flower) over them.

Global state is a flat ``(n_kept,)`` int8 code vector (signs, or ``2b - 1`` for the binary baseline)
over the kept weights of the server's prune masks, in mask key order. A client rebuilds the global model
from the frozen random weights, the masks and the codes, trains its scores locally and uploads
``ceil(n_kept / 8)`` bytes; the server unpacks the uploads and takes a majority vote (ties keep the
current code).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedprune.hidenseek.aggregate import (
    gather_kept,
    majority_vote_signs,
    num_kept_weights,
    pack_signs,
    scatter_kept,
    unpack_signs,
)
from fedprune.hidenseek.sign_supermask import local_train, supermask_layers, to_supermask
from fedprune.hidenseek.train import accuracy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundLog:
    """Test accuracy of the global model after a round, and the bytes each client uploaded."""

    round: int
    test_accuracy: float
    upload_bytes_per_client: int


def initial_codes(prune_masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """All ``+1``: the global model starts as the pruned random network itself. ``(n_kept,)`` int8."""
    return torch.ones(num_kept_weights(prune_masks), dtype=torch.int8)


def global_model(
    base_model: nn.Module,
    prune_masks: dict[str, torch.Tensor],
    codes: torch.Tensor,
    kind: str = "sign",
    init_scale: float = 0.1,
) -> nn.Module:
    """Supermask model of the flat global ``codes`` over the frozen weights of ``base_model``."""
    full_codes = scatter_kept(codes, prune_masks, fill=1)
    return to_supermask(base_model, prune_masks, full_codes, kind, init_scale)


def codes_of_scores(scores: torch.Tensor) -> torch.Tensor:
    """int8 ``+1`` where ``score >= 0``, else ``-1`` (the supermask's own rule): ``(n,)`` -> ``(n,)``."""
    return torch.where(scores >= 0, 1, -1).to(torch.int8)


def set_kept_scores_(
    model: nn.Module, kept_scores: torch.Tensor, prune_masks: dict[str, torch.Tensor]
) -> None:
    """Overwrite the scores of the kept weights of a supermask ``model`` with ``kept_scores (n_kept,)``."""
    layers = supermask_layers(model)
    full = scatter_kept(kept_scores, prune_masks, fill=0.0)
    with torch.no_grad():
        for key, mask in prune_masks.items():
            layers[key].scores[mask] = full[key][mask].to(layers[key].scores.dtype)


def client_update(
    base_model: nn.Module,
    prune_masks: dict[str, torch.Tensor],
    codes: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    kind: str = "sign",
    init_scale: float = 0.1,
    optimizer: str = "sgd",
) -> torch.Tensor:
    """Train locally from the global ``codes``; return the packed new codes of the kept weights (uint8)."""
    model = global_model(base_model, prune_masks, codes, kind, init_scale)
    new_codes = local_train(model, x, y, epochs, lr, batch_size, seed, optimizer)
    return pack_signs(gather_kept(new_codes, prune_masks))


def server_update(uploads: Sequence[torch.Tensor], codes: torch.Tensor) -> torch.Tensor:
    """Majority vote over the unpacked client uploads; ties keep ``codes``. Returns ``(n_kept,)`` int8."""
    stack = torch.stack([unpack_signs(packed, codes.numel()) for packed in uploads])  # (clients, n_kept)
    return majority_vote_signs(stack, codes)


def run_in_process(
    base_model: nn.Module,
    prune_masks: dict[str, torch.Tensor],
    clients: Sequence[tuple[torch.Tensor, torch.Tensor]],
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    rounds: int,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    kind: str = "sign",
    init_scale: float = 0.1,
    optimizer: str = "sgd",
) -> list[RoundLog]:
    """Run ``rounds`` of HideNseek with every client in ``clients`` (``(x, y)`` each) taking part.

    Client ``c`` in round ``r`` (1-based) trains with seed ``seed + 10_000 * r + c``. Returns one log
    per round, starting with round 0 (the untrained global model).
    """
    codes = initial_codes(prune_masks)
    logs = [RoundLog(0, accuracy(global_model(base_model, prune_masks, codes, kind), x_test, y_test), 0)]
    for round_index in range(1, rounds + 1):
        uploads = [
            client_update(
                base_model,
                prune_masks,
                codes,
                x,
                y,
                epochs,
                lr,
                batch_size,
                seed + 10_000 * round_index + client,
                kind,
                init_scale,
                optimizer,
            )
            for client, (x, y) in enumerate(clients)
        ]
        codes = server_update(uploads, codes)
        test_accuracy = accuracy(global_model(base_model, prune_masks, codes, kind), x_test, y_test)
        logs.append(RoundLog(round_index, test_accuracy, int(uploads[0].numel())))
        logger.info("hidenseek round %d: test accuracy %.4f", round_index, test_accuracy)
    return logs
