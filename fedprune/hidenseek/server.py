"""HideNseek, the server's side: R rounds of broadcast, local training, validation, aggregation.

The global state is a flat vector over the kept weights of the server's prune masks (mask key order):
int8 codes in {-1, +1} (signs, or ``2b - 1`` for the binary supermask), float32 scores
(``aggregation=score_delta``) or float32 weights (FedAvg).
Each round every current site gets the mask and the whole current state (so a site that joins late
starts from the current global signs), and replies as ``fedprune/hidenseek/site.py`` describes. A
reply with the wrong array, dtype, length, a non-finite value, a bad example count or a CRC that does
not match what was sent is left out (``Federation.round``). Aggregation: majority vote of the codes
(ties keep the current code), the sign of the example-weighted mean score (``score_average``), the
global scores plus ``server_lr`` times the example-weighted mean of the sites' decoded score changes
(``score_delta``: 1-bit signs times the clip scale, the top changes exact), or the example-weighted
mean of the weights (FedAvg).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from fedprune.hidenseek.aggregate import (
    add_score_delta,
    average_scores,
    fedavg,
    gather_kept,
    majority_vote_signs,
    num_kept_weights,
    pack_signs,
    scatter_kept,
    signs_of_scores,
    top_count,
    unpack_delta_upload,
    unpack_signs,
)
from fedprune.hidenseek.models import prunable_weights
from fedprune.hidenseek.rounds import codes_of_scores, global_model, initial_codes
from fedprune.hidenseek.site import SUPERMASK_KINDS, HideNseekTask, encode_mask, update_crc, with_weights
from fedprune.hidenseek.train import accuracy
from fedprune.protocols.federation import Federation, Reply

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HideNseekJob:
    """Everything the server needs for one run (``task``: what sites are sent, round 0)."""

    variant: str
    aggregation: str
    base_model: nn.Module
    masks: dict[str, torch.Tensor]
    rounds: int
    init_scale: float
    task: HideNseekTask
    x_test: torch.Tensor  # (test, 64)
    y_test: torch.Tensor  # (test,)
    server_lr: float = 1.0  # score_delta: step on the mean of the sites' decoded score changes


@dataclass(frozen=True)
class SiteUpdate:
    """One validated reply."""

    partition_id: int
    num_examples: int
    values: torch.Tensor  # (n_kept,) int8 codes or float32 scores/weights
    scale: float = 1.0  # score_delta: the clip scale the codes are signs at
    top: tuple[torch.Tensor, torch.Tensor] | None = None  # score_delta: exact top changes (index, values)


@dataclass
class RoundRecord:
    """Global test accuracy after a round; bytes per site (by partition id) that round."""

    round: int
    accuracy: float
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    wall_s: float = 0.0


@dataclass
class HideNseekOutcome:
    records: list[RoundRecord]
    state: torch.Tensor  # final global codes or weights, (n_kept,)


def is_supermask(variant: str) -> bool:
    return variant in SUPERMASK_KINDS


def holds_scores(job: HideNseekJob) -> bool:
    """``score_delta``: the global state is float32 scores of the kept weights, not 1-bit codes."""
    return is_supermask(job.variant) and job.aggregation == "score_delta"


def initial_state(job: HideNseekJob) -> torch.Tensor:
    """All-``+1`` codes (the pruned random network), or the kept initial weights for FedAvg."""
    if holds_scores(job):
        return initial_codes(job.masks).float() * job.init_scale
    if is_supermask(job.variant):
        return initial_codes(job.masks)
    weights = {name: w.detach() for name, w in prunable_weights(job.base_model).items()}
    return gather_kept(weights, job.masks).float()


def round_arrays(job: HideNseekJob, state: torch.Tensor) -> dict[str, np.ndarray]:
    """What every site gets this round: the mask (unless dense FedAvg) and the global state."""
    arrays: dict[str, np.ndarray] = {}
    if job.variant != "fedavg_dense":
        arrays["mask"] = encode_mask(job.masks)
    if holds_scores(job):
        arrays["scores"] = state.numpy()
    elif is_supermask(job.variant):
        arrays["codes"] = pack_signs(state).numpy()
    else:
        arrays["weights"] = state.numpy()
    return arrays


def global_network(job: HideNseekJob, state: torch.Tensor) -> nn.Module:
    """The model the global state describes (supermask over frozen weights, or masked weights)."""
    if is_supermask(job.variant):
        codes = codes_of_scores(state) if holds_scores(job) else state
        return global_model(job.base_model, job.masks, codes, SUPERMASK_KINDS[job.variant], job.init_scale)
    return with_weights(job.base_model, scatter_kept(state, job.masks, fill=0.0))


def test_accuracy(job: HideNseekJob, state: torch.Tensor) -> float:
    return accuracy(global_network(job, state), job.x_test, job.y_test)


def _payload_array(reply: Reply, name: str) -> np.ndarray:
    payload = reply.arrays
    if list(payload.keys()) != [name]:
        raise ValueError(f"payload must hold exactly [{name!r}], got {sorted(payload.keys())}")
    return payload[name]


def _check_codes(packed: np.ndarray, num_kept: int) -> None:
    if packed.dtype != np.uint8 or packed.shape != ((num_kept + 7) // 8,):
        raise ValueError(f"codes must be uint8 ({(num_kept + 7) // 8},), got {packed.dtype} {packed.shape}")


def validate_reply(job: HideNseekJob, num_kept: int, crc: int, reply: Reply) -> SiteUpdate:
    """Decode and check one reply; ValueError names what is wrong."""
    metrics = reply.metrics
    num_examples, partition_id = int(metrics["num_examples"]), int(metrics["partition_id"])
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    if int(metrics["crc"]) != crc:
        raise ValueError("the site did not start from this round's global state (CRC mismatch)")
    if holds_scores(job):
        count = top_count(num_kept, job.task.delta_topk)
        signs, scale, top = unpack_delta_upload(_payload_array(reply, "delta"), num_kept, count)
        return SiteUpdate(partition_id, num_examples, signs, scale, top)
    if is_supermask(job.variant) and job.aggregation == "vote":
        packed = _payload_array(reply, "codes")
        _check_codes(packed, num_kept)
        values = unpack_signs(torch.from_numpy(packed), num_kept)
    else:
        name = "scores" if is_supermask(job.variant) else "weights"
        array = _payload_array(reply, name)
        if array.dtype != np.float32 or array.shape != (num_kept,):
            raise ValueError(f"{name} must be float32 ({num_kept},), got {array.dtype} {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError(f"{name} hold NaN or Inf")
        values = torch.from_numpy(array)
    return SiteUpdate(partition_id, num_examples, values)


def reply_validator(job: HideNseekJob, num_kept: int, crc: int) -> Callable[[int, Reply], SiteUpdate]:
    """``validate(node, reply)`` for :meth:`Federation.round` of one round."""
    return lambda node, reply: validate_reply(job, num_kept, crc, reply)


def aggregate(job: HideNseekJob, updates: list[SiteUpdate], state: torch.Tensor) -> torch.Tensor:
    """The next global state from the valid updates."""
    stack = torch.stack([u.values for u in updates])  # (sites, n_kept)
    counts = [u.num_examples for u in updates]
    if holds_scores(job):
        scales = [u.scale for u in updates]
        return add_score_delta(state, stack, scales, counts, job.server_lr, [u.top for u in updates])
    if is_supermask(job.variant) and job.aggregation == "vote":
        return majority_vote_signs(stack, state)
    if is_supermask(job.variant):
        return signs_of_scores(average_scores(stack.double(), counts), state)
    return fedavg([{"w": u.values} for u in updates], counts)["w"]


Aggregate = Callable[[HideNseekJob, list[SiteUpdate], torch.Tensor], torch.Tensor]


def run_hidenseek_rounds(
    fed: Federation, job: HideNseekJob, admit_late: bool = True, aggregate_fn: Aggregate | None = None
) -> HideNseekOutcome:
    """Round 0 (the untrained global model), then ``job.rounds`` federated rounds over ``fed``
    (``aggregate_fn``: another aggregation rule to study, default :func:`aggregate`)."""
    aggregate_fn = aggregate if aggregate_fn is None else aggregate_fn
    state = initial_state(job)
    num_kept = num_kept_weights(job.masks)
    records = [RoundRecord(0, test_accuracy(job, state))]
    known = set(fed.nodes)
    for round_index in range(1, job.rounds + 1):
        if admit_late:
            fed.admit_new_nodes_(known)
        start = time.perf_counter()
        arrays = round_arrays(job, state)
        crc = update_crc(arrays)
        before_up, before_down = dict(fed.bytes_up), dict(fed.bytes_down)
        config = replace(job.task, round=round_index, num_kept=num_kept).to_record()
        valid = fed.round("train.hidenseek", config, arrays, reply_validator(job, num_kept, crc))
        updates = [valid[node] for node in sorted(valid)]
        state = aggregate_fn(job, updates, state)
        partition = {node: update.partition_id for node, update in valid.items()}
        record = RoundRecord(round_index, test_accuracy(job, state), wall_s=time.perf_counter() - start)
        for node, pid in partition.items():
            record.bytes_up[pid] = fed.bytes_up[node] - before_up.get(node, 0)
            record.bytes_down[pid] = fed.bytes_down[node] - before_down.get(node, 0)
        records.append(record)
        logger.info(
            "hidenseek %s round %d: accuracy %.4f, %d sites, %.0f B up per site",
            job.variant,
            round_index,
            record.accuracy,
            len(valid),
            np.mean(list(record.bytes_up.values())),
        )
    return HideNseekOutcome(records, state)
