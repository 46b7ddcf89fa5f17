"""What the LLM protocols' server routines share: the run's :class:`FederatedJob`, its outcome, and the
per-block loop of the layer-synchronous protocols (``stats_sync``, ``mask_vote_sync``).

Per block b the server sends the task with the edit of block b-1 (its masks, or its weights when kept
weights changed), obtains the SUM of the sites' payloads (:mod:`fedprune.protocols.sums`), decides
block b, and records which sites' data entered that sum.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from fedprune.masks import Pattern, sparsity_of
from fedprune.models import find_blocks
from fedprune.payload import encode_masks, encode_weights
from fedprune.protocols.federation import Federation
from fedprune.protocols.messages import BlockTask, MethodSpec, SiteJob
from fedprune.protocols.sums import PRIVACY, Sums
from fedprune.pruners.base import Pruner
from fedprune.secure.plan import SecurePlan

logger = logging.getLogger(__name__)


@dataclass
class FederatedJob:
    """What a server routine needs: the global model (pruned in place), the method, the sites' job."""

    model: torch.nn.Module
    pruner: Pruner
    method: MethodSpec
    pattern: Pattern
    site_job: SiteJob
    options: object = None  # the protocol's typed config
    seed: int = 0
    progress: bool = True
    privacy: str = "none"  # none | secagg | secagg_dp
    plan: SecurePlan | None = None  # public secure-aggregation parameters (privacy != none)

    @property
    def sparsity(self) -> float:
        return self.method.sparsity

    def sums(self, fed: Federation) -> Sums:
        """This run's way of summing the sites' payloads."""
        return PRIVACY[self.privacy](fed, self.plan, self.pruner.stat_kind)


@dataclass
class FederatedOutcome:
    """What a server routine reports besides the pruned model: which sites' data entered each sum."""

    layer_sparsity: dict[str, float] = field(default_factory=dict)
    votes: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # mask_vote: keep counts by "<block>.<layer>"
    vote_sites: int = 0  # mask_vote: how many sites' masks the counts sum
    sites_per_sum: list[tuple[int, ...]] = field(default_factory=list)  # node ids, one entry per sum
    tokens: dict[int, int] = field(default_factory=dict)  # calibration tokens by node

    def record(self, blocks_name: str, block: int, masks: dict[str, torch.Tensor]) -> None:
        for name, mask in masks.items():
            self.layer_sparsity[f"{blocks_name}.{block}.{name}"] = sparsity_of(mask)

    @property
    def final_sites(self) -> tuple[int, ...]:
        """The sites whose data entered the last sum (those of the pruned model's last block)."""
        return self.sites_per_sum[-1] if self.sites_per_sum else ()

    @property
    def calib_tokens(self) -> int:
        """Calibration tokens of the sites in the last sum."""
        return sum(self.tokens[node] for node in self.final_sites)


def task_config(job: FederatedJob, block: BlockTask | None = None) -> dict:
    """The flat record of one task: the site job, the method and, per block, the block task."""
    config = {**job.site_job.to_record(), **job.method.to_record()}
    return {**config, **block.to_record()} if block is not None else config


def start_sites(fed: Federation, job: FederatedJob) -> dict[int, int]:
    """``query.start`` to every site; their token counts."""
    return fed.round(
        "query.start", job.site_job.to_record(), None, lambda node, reply: int(reply.metrics["tokens"])
    )


def finish_sites(fed: Federation, job: FederatedJob) -> None:
    """``query.finish``: every site deletes its state of the run."""
    fed.round("query.finish", job.site_job.to_record(), None, lambda node, reply: None)


def update_arrays(masks: dict, weights: dict, send_weights: bool) -> tuple[dict, str]:
    """What changed in a block, in the cheapest form: masks unless kept weights changed."""
    return (encode_weights(weights), "weights") if send_weights else (encode_masks(masks), "masks")


BlockStep = Callable[[Sums, int, dict, dict | None, dict[int, int]], tuple[dict, dict, bool, tuple]]


def layer_sync(fed: Federation, job: FederatedJob, label: str, step: BlockStep) -> FederatedOutcome:
    """The per-block loop of the layer-synchronous protocols (one sum per block).

    ``step(sums, block, config, update, tokens)`` returns the block's keep-masks, new weights, whether
    the weights (not the masks) must travel, and the sites whose data entered its sum.
    """
    outcome = FederatedOutcome()
    outcome.tokens = start_sites(fed, job)
    blocks_name, blocks = find_blocks(job.model)
    sums = job.sums(fed)
    update, update_kind = None, "masks"
    for block in tqdm(range(len(blocks)), desc=f"federated {label}", disable=not job.progress):
        config = task_config(job, BlockTask(block, update_kind))
        if block == 0:
            sums.prepare(config, len(blocks))
        masks, weights, send_weights, sites = step(sums, block, config, update, outcome.tokens)
        outcome.record(blocks_name, block, masks)
        outcome.sites_per_sum.append(sites)
        update, update_kind = update_arrays(masks, weights, send_weights)
    finish_sites(fed, job)
    return outcome
