"""Protocol workflows on the server (thin: all maths is in fedprune/). A registry maps protocol names
(the Hydra ``protocol`` group) to workflows.

``stats_sync``      per block: sites send summed statistics; the server adds them and prunes with the
                    centralized code (identical result to centralized pruning on the pooled data).
``mask_vote_sync``  per block: sites send their own masks; the server votes (FedPrLLM, iterative).
``mask_vote``       one round: sites prune their own copies fully and send all masks (FedPrLLM one-shot).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from fedprune.aggregation.block import aggregate_stats, prune_block_from_stats_, vote_block_
from fedprune.masks import Pattern, sparsity_of
from fedprune.models import find_blocks, find_prunable_layers, layer_input_features
from fedprune.payload import decode_masks, decode_stats, encode_masks, encode_weights
from fedprune.pruners.base import Pruner
from fedprune.site import block_layer_shapes
from server.rounds import Federation, reply_arrays

logger = logging.getLogger(__name__)


@dataclass
class FederatedJob:
    """What a workflow needs: the global model (pruned in place), the method, and the sites' config."""

    model: torch.nn.Module
    pruner: Pruner
    pruner_params: dict
    sparsity: float
    pattern: Pattern
    group: str  # mask_vote comparison group: layer | row | column
    scaling: bool  # mask_vote weight scaling
    seed: int
    site_config: dict  # model path, corpus, windows, ... sent to every site
    progress: bool = True


@dataclass
class FederatedOutcome:
    """What a workflow reports besides the pruned model."""

    layer_sparsity: dict[str, float] = field(default_factory=dict)
    calib_tokens: int = 0
    num_clients: int = 0


def _method_config(job: FederatedJob) -> dict:
    return {
        "pruner": job.pruner.name,
        "pruner_params": json.dumps(job.pruner_params),
        "sparsity": float(job.sparsity),
        "pattern": str(job.pattern),
        "stat_kind": job.pruner.stat_kind or "",
    }


def _record(outcome: FederatedOutcome, blocks_name: str, block: int, masks: dict) -> None:
    for name, mask in masks.items():
        outcome.layer_sparsity[f"{blocks_name}.{block}.{name}"] = sparsity_of(mask)


def _start(fed: Federation, job: FederatedJob) -> dict[int, int]:
    """``query.start`` to every site; their token counts."""
    return fed.round(
        "query.start", job.site_config, None, lambda node, reply: int(reply.content["metrics"]["tokens"])
    )


def _update_arrays(masks: dict, weights: dict, send_weights: bool) -> tuple[dict, str]:
    """What changed in a block, in the cheapest form: masks unless kept weights changed."""
    return (encode_weights(weights), "weights") if send_weights else (encode_masks(masks), "masks")


def _layer_sync(
    fed: Federation, job: FederatedJob, message_type: str, aggregate: Callable
) -> FederatedOutcome:
    """The per-block loop shared by the layer-synchronous protocols."""
    outcome = FederatedOutcome()
    tokens = _start(fed, job)
    outcome.calib_tokens = sum(tokens.values())
    blocks_name, blocks = find_blocks(job.model)
    update, update_kind = None, "masks"
    for block in tqdm(range(len(blocks)), desc=f"federated {message_type}", disable=not job.progress):
        config = {**job.site_config, **_method_config(job), "block": block, "update_kind": update_kind}
        validate = _validator(job, block, message_type, tokens)
        replies = fed.round(f"train.{message_type}", config, update, validate)
        masks, weights, send_weights = aggregate(block, list(replies.values()))
        _record(outcome, blocks_name, block, masks)
        update, update_kind = _update_arrays(masks, weights, send_weights)
    fed.round("query.finish", job.site_config, None, lambda node, reply: None)
    outcome.num_clients = len(tokens)
    return outcome


def _validator(job: FederatedJob, block: int, message_type: str, tokens: dict[int, int]) -> Callable:
    blocks = find_blocks(job.model)[1]
    shapes = block_layer_shapes(job.model, block)
    if message_type == "masks":
        return lambda node, reply: decode_masks(reply_arrays(reply), shapes)
    widths = {name: layer_input_features(m) for name, m in find_prunable_layers(blocks[block]).items()}
    return lambda node, reply: decode_stats(reply_arrays(reply), job.pruner.stat_kind, widths, tokens[node])


def run_stats_sync(fed: Federation, job: FederatedJob) -> FederatedOutcome:
    """Exact federated pruning: summed statistics, centralized pruning code, per block."""
    if job.pruner.stat_kind is None:
        raise ValueError(f"stats_sync needs a pruner with statistics; {job.pruner.name!r} is data-free")

    def aggregate(block: int, site_stats: list) -> tuple[dict, dict, bool]:
        stats = aggregate_stats(site_stats)
        masks, weights = prune_block_from_stats_(
            job.model, block, stats, job.pruner, job.sparsity, job.pattern
        )
        return masks, weights, job.pruner.updates_weights

    return _layer_sync(fed, job, "stats", aggregate)


def run_mask_vote_sync(fed: Federation, job: FederatedJob) -> FederatedOutcome:
    """FedPrLLM iterative: per block, the sites' own masks are voted into the global mask."""

    def aggregate(block: int, site_masks: list) -> tuple[dict, dict, bool]:
        masks, weights = vote_block_(
            job.model, block, site_masks, job.sparsity, job.pattern, job.group, job.scaling, job.seed
        )
        return masks, weights, job.scaling

    return _layer_sync(fed, job, "masks", aggregate)


def run_mask_vote(fed: Federation, job: FederatedJob) -> FederatedOutcome:
    """FedPrLLM one-shot: every site prunes its own copy; one upload of all masks; vote per layer."""
    outcome = FederatedOutcome()
    blocks_name, blocks = find_blocks(job.model)
    shapes = {
        f"{b}.{name}": shape
        for b in range(len(blocks))
        for name, shape in block_layer_shapes(job.model, b).items()
    }
    config = {**job.site_config, **_method_config(job)}
    tokens: dict[int, int] = {}

    def validate(node, reply):
        tokens[node] = int(reply.content["metrics"]["tokens"])
        return decode_masks(reply_arrays(reply), shapes)

    replies = list(fed.round("train.local_prune", config, None, validate).values())
    for block in range(len(blocks)):
        prefix = f"{block}."
        site_masks = [{k[len(prefix) :]: v for k, v in m.items() if k.startswith(prefix)} for m in replies]
        masks, _ = vote_block_(
            job.model, block, site_masks, job.sparsity, job.pattern, job.group, job.scaling, job.seed
        )
        _record(outcome, blocks_name, block, masks)
    outcome.calib_tokens = sum(tokens[n] for n in tokens)
    outcome.num_clients = len(replies)
    return outcome


WORKFLOWS: dict[str, Callable[[Federation, FederatedJob], FederatedOutcome]] = {
    "stats_sync": run_stats_sync,
    "mask_vote_sync": run_mask_vote_sync,
    "mask_vote": run_mask_vote,
}
