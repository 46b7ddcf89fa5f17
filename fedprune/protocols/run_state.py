"""A federated run's state in a checkpoint (JSON), and its continuation under new node ids.

A layer-synchronous run (``stats_sync``) checkpoints after every block (:class:`RunCheckpoints`): the
server's pruned block and its encoded edit (:mod:`fedprune.checkpoint`), and as JSON the edit kinds,
each node's site number, the outcome so far (sums' sites, tokens, layer sparsity, the allocation), the
federation's counters (alive nodes, bytes, rounds, rejected replies) and the sums' progress (the next
secure-aggregation instance). Node ids change when a run restarts (Flower draws them), so a resumed run
maps the checkpoint's node ids onto the new ones by site number (:func:`remap_`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from fedprune import checkpoint
from fedprune.allocation import Allocation
from fedprune.allocation_rules import Allocated
from fedprune.checkpoint import Checkpoint
from fedprune.config import JobConfig
from fedprune.protocols.federation import Federation

logger = logging.getLogger(__name__)


def _ints(keys: dict) -> dict[int, object]:
    return {int(k): v for k, v in keys.items()}


def federation_state(fed: Federation) -> dict:
    """The federation's counters and alive nodes, as JSON."""
    return {
        "nodes": [int(n) for n in fed.nodes],
        "bytes_up": {str(n): int(b) for n, b in fed.bytes_up.items()},
        "bytes_down": {str(n): int(b) for n, b in fed.bytes_down.items()},
        "round_seconds": [float(s) for s in fed.round_seconds],
        "rejected": [[int(r), int(n), str(why)] for r, n, why in fed.rejected],
        "site_numbers": {str(n): int(s) for n, s in fed.site_numbers.items()},
    }


def restore_federation_(fed: Federation, state: dict) -> None:
    """Put a checkpoint's counters before this run's (its rounds first, so numbering continues)."""
    for name in ("bytes_up", "bytes_down"):
        table = defaultdict(int, {int(n): int(b) for n, b in state[name].items()})
        for node, count in getattr(fed, name).items():
            table[node] += count
        setattr(fed, name, table)
    shift = len(state["round_seconds"])
    fed.rejected = [(int(r), int(n), why) for r, n, why in state["rejected"]] + [
        (r + shift, n, why) for r, n, why in fed.rejected
    ]
    fed.round_seconds = [*state["round_seconds"], *fed.round_seconds]
    fed.site_numbers = {**_ints(state["site_numbers"]), **fed.site_numbers}


def outcome_state(outcome) -> dict:
    """A :class:`~fedprune.protocols.layer_sync.FederatedOutcome` so far, as JSON."""
    allocation = outcome.allocation
    return {
        "layer_sparsity": dict(outcome.layer_sparsity),
        "sites_per_sum": [[int(n) for n in sites] for sites in outcome.sites_per_sum],
        "depth_sites": None if outcome.depth_sites is None else [int(n) for n in outcome.depth_sites],
        "tokens": {str(n): int(t) for n, t in outcome.tokens.items()},
        "allocation": None
        if allocation is None
        else {"sparsity": allocation.allocation.default, "block_sparsity": allocation.block_sparsity}
        | {"block_score": allocation.block_score},
        "allocation_sites": [int(n) for n in outcome.allocation_sites],
    }


def restore_outcome_(outcome, state: dict) -> None:
    """Fill an empty outcome from :func:`outcome_state` (node ids as in the checkpoint)."""
    outcome.layer_sparsity = dict(state["layer_sparsity"])
    outcome.sites_per_sum = [tuple(sites) for sites in state["sites_per_sum"]]
    outcome.depth_sites = None if state["depth_sites"] is None else tuple(state["depth_sites"])
    outcome.tokens = _ints(state["tokens"])
    saved = state["allocation"]
    if saved is not None:
        default = Allocation(float(saved["sparsity"]))
        outcome.allocation = Allocated(default, list(saved["block_sparsity"]), list(saved["block_score"]))
    outcome.allocation_sites = tuple(state["allocation_sites"])


def node_mapping(old_sites: dict[int, int], new_sites: dict[int, int]) -> dict[int, int]:
    """Checkpoint node id -> this run's node id, for the sites (by number) that are here again."""
    by_site = {site: node for node, site in new_sites.items()}
    return {node: by_site[site] for node, site in old_sites.items() if site in by_site}


def remap_(fed: Federation, outcome, mapping: dict[int, int]) -> None:
    """Rename the checkpoint's node ids in ``fed``'s counters and ``outcome`` to this run's
    (``mapping``; ids of sites not here keep their old id)."""

    def new(node: int) -> int:
        return mapping.get(node, node)

    for name in ("bytes_up", "bytes_down"):
        table = defaultdict(int)
        for node, count in getattr(fed, name).items():
            table[new(node)] += count
        setattr(fed, name, table)
    fed.rejected = [(r, new(n), why) for r, n, why in fed.rejected]
    outcome.sites_per_sum = [tuple(sorted(new(n) for n in sites)) for sites in outcome.sites_per_sum]
    if outcome.depth_sites is not None:
        outcome.depth_sites = tuple(sorted(new(n) for n in outcome.depth_sites))
    outcome.allocation_sites = tuple(sorted(new(n) for n in outcome.allocation_sites))
    outcome.tokens = {new(n): t for n, t in outcome.tokens.items()}
    fed.site_numbers = {new(n): s for n, s in fed.site_numbers.items()}


@dataclass
class RunCheckpoints:
    """Where a federated run checkpoints each finished block, and the checkpoint it resumes (``saved``)."""

    out_dir: Path
    job: JobConfig
    saved: Checkpoint | None = None

    def save(
        self,
        run_key: str,
        blocks: list[int],
        module: nn.Module,
        edit: dict[str, np.ndarray],
        state: dict,
    ) -> None:
        """Block ``blocks[-1]`` finished (``module``: it pruned; ``edit``: it encoded for the sites)."""
        checkpoint.save_block(self.out_dir, blocks[-1], module, edit)
        checkpoint.save_state(self.out_dir, self.job, run_key, blocks, state)
