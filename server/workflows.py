"""Protocol workflows on the server (thin: all maths is in fedprune/). A registry maps protocol names
(the Hydra ``protocol`` group) to workflows.

``stats_sync``      per block: sites send summed statistics; the server adds them and prunes with the
                    centralized code (identical result to centralized pruning on the pooled data).
``mask_vote_sync``  per block: sites send their own masks; the server votes (FedPrLLM, iterative).
``mask_vote``       one round: sites prune their own copies fully and send all masks (FedPrLLM one-shot).

Privacy (the Hydra ``privacy`` group): ``PRIVACY`` maps a setting to how the server obtains the SUM of
the sites' payloads: in the clear (``none``), or by secure aggregation (``secagg``, ``secagg_dp``:
``server/secure_rounds.py``), where it never sees one site's statistics or masks. A ``PRIVACY`` class
is instantiated per run: secure sums keep the keys agreed for the run's later sums.
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
from server.secure_rounds import PreparedSum, prepare_sums, secure_stats, secure_vote_counts

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


class Sums:
    """How the server gets the SUM of the sites' payloads, one per block or per run (one object per run)."""

    def __init__(self, fed: Federation, job: FederatedJob):
        self.fed, self.job = fed, job

    def prepare(self, config: dict, count: int) -> None:
        """Called once before a run's ``count`` sums (``config``: the first sum's)."""
        raise NotImplementedError

    def stats(
        self, config: dict, update: dict | None, widths: dict[str, int], tokens: dict[int, int]
    ) -> dict[str, Stats]:
        """The summed statistics of one block (``{layer: Stats}``)."""
        raise NotImplementedError

    def votes(self, task: str, config: dict, update: dict | None, shapes: dict) -> Votes:
        """Per layer, how many sites kept each weight; the number of sites; their tokens."""
        raise NotImplementedError


class PlainSums(Sums):
    """``privacy=none``: sites send their payloads in the clear; the server adds them up itself.

    The server sees every site's statistics or masks."""

    def prepare(self, config: dict, count: int) -> None:
        """Nothing to agree on before plain sums."""

    def stats(
        self, config: dict, update: dict | None, widths: dict[str, int], tokens: dict[int, int]
    ) -> dict[str, Stats]:
        kind = self.job.pruner.stat_kind

        def validate(node, reply):
            return decode_stats(reply_arrays(reply), kind, widths, tokens[node])

        return aggregate_stats(list(self.fed.round("train.stats", config, update, validate).values()))

    def votes(self, task: str, config: dict, update: dict | None, shapes: dict) -> Votes:
        tokens: dict[int, int] = {}

        def validate(node, reply):
            tokens[node] = int(reply.content["metrics"]["tokens"])
            return decode_masks(reply_arrays(reply), shapes)

        masks = list(self.fed.round(f"train.{task}", config, update, validate).values())
        counts = {name: vote_counts([m[name] for m in masks]) for name in shapes}
        return counts, len(masks), {n: tokens[n] for n in tokens}


class SecureSums(Sums):
    """``privacy=secagg`` / ``secagg_dp``: every sum is a secure-aggregation instance whose keys were
    agreed beforehand (``prepare``: two rounds for all of a run's sums; see ``server/secure_rounds.py``)."""

    def __init__(self, fed: Federation, job: FederatedJob):
        super().__init__(fed, job)
        self._ready: list[PreparedSum] = []
        self._instances = 0

    def prepare(self, config: dict, count: int) -> None:
        """Agree keys for the next ``count`` sums."""
        self._ready += prepare_sums(self.fed, config, self.job.plan, self._instances, count)
        self._instances += count

    def _take(self, config: dict) -> PreparedSum:
        if not self._ready:
            self.prepare(config, 1)
        return self._ready.pop(0)

    def stats(
        self, config: dict, update: dict | None, widths: dict[str, int], tokens: dict[int, int]
    ) -> dict[str, Stats]:
        prepared = self._take(config)
        return secure_stats(
            self.fed, prepared, config, update, self.job.plan, self.job.pruner.stat_kind, widths, tokens
        )

    def votes(self, task: str, config: dict, update: dict | None, shapes: dict) -> Votes:
        return secure_vote_counts(self.fed, self._take(config), task, config, update, self.job.plan, shapes)


PRIVACY: dict[str, type[Sums]] = {"none": PlainSums, "secagg": SecureSums, "secagg_dp": SecureSums}


def _layer_sync(fed: Federation, job: FederatedJob, message_type: str, step: Callable) -> FederatedOutcome:
    """The per-block loop shared by the layer-synchronous protocols (one sum per block)."""
    outcome = FederatedOutcome()
    tokens = _start(fed, job)
    outcome.calib_tokens = sum(tokens.values())
    blocks_name, blocks = find_blocks(job.model)
    sums = PRIVACY[job.privacy](fed, job)
    update, update_kind = None, "masks"
    for block in tqdm(range(len(blocks)), desc=f"federated {message_type}", disable=not job.progress):
        config = {**job.site_config, **_method_config(job), "block": block, "update_kind": update_kind}
        if block == 0:
            sums.prepare(config, len(blocks))
        masks, weights, send_weights = step(sums, block, config, update, tokens)
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
        sums: Sums, block: int, config: dict, update: dict | None, tokens: dict[int, int]
    ) -> tuple[dict, dict, bool]:
        layers = find_prunable_layers(blocks[block])
        widths = {name: layer_input_features(m) for name, m in layers.items()}
        stats = sums.stats(config, update, widths, tokens)
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
        sums: Sums, block: int, config: dict, update: dict | None, tokens: dict[int, int]
    ) -> tuple[dict, dict, bool]:
        shapes = block_layer_shapes(job.model, block)
        counts, num_sites, _ = sums.votes("masks", config, update, shapes)
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
    counts, num_sites, tokens = PRIVACY[job.privacy](fed, job).votes("local_prune", config, None, shapes)
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
