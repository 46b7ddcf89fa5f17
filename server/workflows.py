"""Protocol workflows on the server (thin: all maths is in fedprune/). A registry maps protocol names
(the Hydra ``protocol`` group) to workflows.

``stats_sync``      per block: sites send summed statistics; the server adds them and prunes with the
                    centralized code (identical result to centralized pruning on the pooled data).
``mask_vote_sync``  per block: sites send their own masks; the server votes (FedPrLLM, iterative).
``mask_vote``       one round: sites prune their own copies fully and send all masks (FedPrLLM one-shot).

Privacy (the Hydra ``privacy`` group): ``PRIVACY`` maps a setting to how the server obtains the SUM of
the sites' payloads: in the clear (``none``), or by secure aggregation (``secagg``, ``secagg_dp``:
``server/secure_rounds.py``), where it never sees one site's statistics or masks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from fedprune.aggregation.block import (
    aggregate_stats,
    prune_block_from_stats_,
    vote_block_from_counts_,
    vote_model_from_counts_,
)
from fedprune.aggregation.mask_vote import vote_counts
from fedprune.masks import Pattern, sparsity_of
from fedprune.models import find_blocks, find_prunable_layers, layer_input_features
from fedprune.payload import decode_masks, decode_stats, encode_masks, encode_weights
from fedprune.pruners.base import Pruner
from fedprune.secure.plan import SecurePlan
from fedprune.site import block_layer_shapes
from fedprune.stats import Stats
from server.rounds import Federation, reply_arrays
from server.secure_rounds import secure_stats, secure_vote_counts

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
    privacy: str = "none"  # none | secagg | secagg_dp
    plan: SecurePlan | None = None  # public secure-aggregation parameters (privacy != none)


@dataclass
class FederatedOutcome:
    """What a workflow reports besides the pruned model."""

    layer_sparsity: dict[str, float] = field(default_factory=dict)
    calib_tokens: int = 0
    votes: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # mask_vote: keep counts by "<block>.<layer>"
    vote_sites: int = 0  # mask_vote: how many sites' masks the counts sum
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


Votes = tuple[dict[str, torch.Tensor], int, dict[int, int]]  # keep counts per layer, sites, tokens


@dataclass(frozen=True)
class Aggregator:
    """How the server gets the sum of the sites' payloads of one round (plain or secure)."""

    stats: Callable[[Federation, FederatedJob, dict, dict | None, dict[str, int], dict[int, int]], dict]
    votes: Callable[[Federation, FederatedJob, str, dict, dict | None, dict], Votes]


def _plain_stats(fed, job, config, update, widths, tokens) -> dict[str, Stats]:
    kind = job.pruner.stat_kind

    def validate(node, reply):
        return decode_stats(reply_arrays(reply), kind, widths, tokens[node])

    return aggregate_stats(list(fed.round("train.stats", config, update, validate).values()))


def _plain_votes(fed, job, task, config, update, shapes) -> Votes:
    tokens: dict[int, int] = {}

    def validate(node, reply):
        tokens[node] = int(reply.content["metrics"]["tokens"])
        return decode_masks(reply_arrays(reply), shapes)

    masks = list(fed.round(f"train.{task}", config, update, validate).values())
    counts = {name: vote_counts([m[name] for m in masks]) for name in shapes}
    return counts, len(masks), {n: tokens[n] for n in tokens}


def _secure_stats(fed, job, config, update, widths, tokens) -> dict[str, Stats]:
    return secure_stats(fed, config, update, job.plan, job.pruner.stat_kind, widths, tokens)


def _secure_votes(fed, job, task, config, update, shapes) -> Votes:
    return secure_vote_counts(fed, task, config, update, job.plan, shapes)


PRIVACY: dict[str, Aggregator] = {
    "none": Aggregator(_plain_stats, _plain_votes),
    "secagg": Aggregator(_secure_stats, _secure_votes),
    "secagg_dp": Aggregator(_secure_stats, _secure_votes),
}


def _layer_sync(fed: Federation, job: FederatedJob, message_type: str, step: Callable) -> FederatedOutcome:
    """The per-block loop shared by the layer-synchronous protocols."""
    outcome = FederatedOutcome()
    tokens = _start(fed, job)
    outcome.calib_tokens = sum(tokens.values())
    blocks_name, blocks = find_blocks(job.model)
    update, update_kind = None, "masks"
    for block in tqdm(range(len(blocks)), desc=f"federated {message_type}", disable=not job.progress):
        config = {**job.site_config, **_method_config(job), "block": block, "update_kind": update_kind}
        masks, weights, send_weights = step(block, config, update, tokens)
        _record(outcome, blocks_name, block, masks)
        update, update_kind = _update_arrays(masks, weights, send_weights)
    fed.round("query.finish", job.site_config, None, lambda node, reply: None)
    outcome.num_clients = len(tokens)
    return outcome


def run_stats_sync(fed: Federation, job: FederatedJob) -> FederatedOutcome:
    """Exact federated pruning: summed statistics, centralized pruning code, per block."""
    if job.pruner.stat_kind is None:
        raise ValueError(f"stats_sync needs a pruner with statistics; {job.pruner.name!r} is data-free")
    blocks = find_blocks(job.model)[1]

    def step(
        block: int, config: dict, update: dict | None, tokens: dict[int, int]
    ) -> tuple[dict, dict, bool]:
        layers = find_prunable_layers(blocks[block])
        widths = {name: layer_input_features(m) for name, m in layers.items()}
        stats = PRIVACY[job.privacy].stats(fed, job, config, update, widths, tokens)
        masks, weights = prune_block_from_stats_(
            job.model, block, stats, job.pruner, job.sparsity, job.pattern
        )
        return masks, weights, job.pruner.updates_weights

    return _layer_sync(fed, job, "stats", step)


def _vote(job: FederatedJob, block: int, counts: dict, num_sites: int) -> tuple[dict, dict]:
    return vote_block_from_counts_(
        job.model, block, counts, num_sites, job.sparsity, job.pattern, job.group, job.scaling, job.seed
    )


def run_mask_vote_sync(fed: Federation, job: FederatedJob) -> FederatedOutcome:
    """FedPrLLM iterative: per block, the sites' own masks are voted into the global mask."""

    def step(
        block: int, config: dict, update: dict | None, tokens: dict[int, int]
    ) -> tuple[dict, dict, bool]:
        shapes = block_layer_shapes(job.model, block)
        counts, num_sites, _ = PRIVACY[job.privacy].votes(fed, job, "masks", config, update, shapes)
        masks, weights = _vote(job, block, counts, num_sites)
        return masks, weights, job.scaling

    return _layer_sync(fed, job, "masks", step)


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
    counts, num_sites, tokens = PRIVACY[job.privacy].votes(fed, job, "local_prune", config, None, shapes)
    masks = vote_model_from_counts_(
        job.model, counts, num_sites, job.sparsity, job.pattern, job.group, job.scaling, job.seed
    )
    for block, block_masks in masks.items():
        _record(outcome, blocks_name, block, block_masks)
    outcome.votes, outcome.vote_sites = counts, num_sites
    outcome.calib_tokens = sum(tokens.values())
    outcome.num_clients = num_sites
    return outcome


WORKFLOWS: dict[str, Callable[[Federation, FederatedJob], FederatedOutcome]] = {
    "stats_sync": run_stats_sync,
    "mask_vote_sync": run_mask_vote_sync,
    "mask_vote": run_mask_vote,
}
