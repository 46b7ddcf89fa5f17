"""The LLM protocols' site tasks: calibration windows, block statistics, own masks, local pruning.

A site never sends tokens, activations or per-sample values: only summed statistics with counts, or
bit-packed masks. Every request's config is a :class:`~fedprune.protocols.messages.SiteJob` record, plus
:class:`MethodSpec` and :class:`BlockTask` where the task needs them. A site's private data is either its
partition of the bundled corpus (``partition-id`` and ``num-partitions`` in its node config, as in
simulation) or its own folder of ``<work>.txt`` files (``data-path``, as at a real site).

Shared tasks: ``query.start`` (sample the site's windows, embed them, keep block-0 inputs),
``query.finish`` (delete the site's state of the run) and, for a resumed run (``resume=true``),
``query.resume`` (what the site still holds for the run key) and ``query.advance`` (move a restarted
site's inputs past a checkpointed block edit). Each protocol registers its own summed task with
:func:`summed_task` (``train.stats`` in ``stats_sync.py``, ``train.masks`` in ``mask_vote_sync.py``,
``train.local_prune`` in ``mask_vote.py``): a payload function returning the plain payload and the
site's tokens; the plain task encodes it, and the secure task (``fedprune/protocols/secure_site.py``)
wraps the same payload.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedprune.data.assets import resolve_corpus_path, resolve_model_path
from fedprune.data.sites import site_window_count, site_windows
from fedprune.data.windows import sample_windows
from fedprune.edits import decode_edit
from fedprune.payload import encode_masks
from fedprune.protocols.federation import Reply, Request
from fedprune.protocols.messages import STRUCTURED, BlockTask, MethodSpec, SiteJob
from fedprune.protocols.site_policy import PolicyError, SitePolicy
from fedprune.protocols.site_state import (
    dense_blocks,
    drop_state,
    load_state,
    save_state,
    secagg_mark,
    tokenized_works,
)
from fedprune.protocols.tasks import Site, reply, site_task
from fedprune.pruners import get_pruner
from fedprune.sequential import BlockAccess, held_block
from fedprune.site import (
    SiteState,
    advance_site_,
    block_layer_shapes,
    skip_removed_blocks_,
    start_site,
)
from fedprune.structured.decide import Structure

logger = logging.getLogger(__name__)


def calibration_ids(job: SiteJob, site: Site) -> torch.Tensor:
    """The site's private calibration windows ``(windows, seq_len)``.

    A real site (``data-path``) samples its share of ``total_windows`` (split as in simulation: site
    ``partition-id`` of ``num_sites``, the first ``total % sites`` get one more) from all of its works.
    """
    model_path = str(resolve_model_path(job.model))
    node = site.node_config
    if "data-path" in node:
        if "partition-id" not in node:
            raise ValueError(
                "node config: a site with 'data-path' also needs 'partition-id' (its site index)"
            )
        index = int(node["partition-id"])
        if not 0 <= index < job.num_sites:
            raise ValueError(f"node config: partition-id {index} outside [0, {job.num_sites})")
        docs = tokenized_works(model_path, str(node["data-path"]))
        count = site_window_count(job.total_windows, index, job.num_sites)
        return sample_windows(docs, count, job.seq_len, job.seed * 1000 + index + 1)
    corpus = str(resolve_corpus_path(job.corpus))
    docs = tokenized_works(model_path, corpus, job.heldout)
    index, num_sites = int(node["partition-id"]), int(node["num-partitions"])
    if num_sites != job.num_sites:
        raise ValueError(f"node config: num-partitions {num_sites} but the job has {job.num_sites} sites")
    return site_windows(job.partitioner, docs, index, num_sites, job.total_windows, job.seq_len, job.seed)


def site_blocks(job: SiteJob) -> BlockAccess:
    """The dense model named in the job (a bundled name or a folder at this site), read-only, and where
    its blocks are (``job.offload``: on disk, one materialised per task)."""
    return dense_blocks(str(resolve_model_path(job.model)), job.dtype, job.offload)


def site_model(job: SiteJob) -> torch.nn.Module:
    """The dense model named in the job, read-only (:func:`site_blocks`)."""
    return site_blocks(job).model


def site_pruner(method: MethodSpec):
    return get_pruner(method.pruner, **method.pruner_params)


def site_structure(method: MethodSpec, model: torch.nn.Module) -> Structure | None:
    """``pattern=structured``: the units this site removes from every block (the job's fractions on its
    dense model) and how many whole blocks and attention sublayers go; ``None`` for other patterns."""
    if method.pattern != STRUCTURED:
        return None
    return Structure.for_model(
        model,
        method.structured_ffn,
        method.structured_heads,
        method.structured_blocks,
        method.structured_attention,
    )


def apply_update_(
    blocks: BlockAccess, state: SiteState, task: BlockTask, update: dict | None, ignore=()
) -> None:
    """Move past the previous block if the request carries its globally pruned version (unless the site
    already moved past it: a resumed run sends the edit again), then past the removed blocks before
    ``task.block`` (structured depth pruning)."""
    if update and state.block <= task.previous:  # past it already: a resumed run re-sends that edit
        block = task.previous
        edit = decode_edit(task.update_kind, update, block_layer_shapes(blocks.model, block, ignore))
        advance_site_(blocks.model, state, block, edit, blocks, block in task.removed_attention)
    skip_removed_blocks_(state, task.removed_blocks)


@dataclass(frozen=True)
class Payload:
    """A site's plain payload for a summed task: statistics arrays or keep-masks, and its tokens."""

    kind: str  # "stats" | "masks"
    values: dict  # encode_stats arrays, or {layer: bool mask} (structured: {granularity: (1, units) votes})
    tokens: int


def block_payload(site: Site, request: Request, compute: Callable) -> tuple[object, int]:
    """[Apply block b-1], then ``compute(model, state, job, method, task)``; the result and the tokens."""
    job, method = SiteJob.from_record(request.config), MethodSpec.from_record(request.config)
    task = BlockTask.from_record(request.config)
    blocks = site_blocks(job)
    state = load_state(job.run_key, site.key)
    apply_update_(blocks, state, task, request.update, job.ignore)
    with held_block(blocks, task.block):  # offloaded: the only block in memory
        result = compute(blocks.model, state, job, method, task)
    save_state(job.run_key, site.key, state)
    return result, state.tokens


# payload name (the ``secagg.task`` of a secure sum) -> payload function (each protocol registers its own)
PAYLOADS: dict[str, Callable[..., Payload]] = {}


def summed_task(name: str) -> Callable:
    """Register a payload function ``(site, request, token_bound=None) -> Payload`` as the plain site
    task ``train.<name>`` and as the payload the secure task wraps (``train.secagg``, ``secagg.task``)."""

    def register(payload: Callable[..., Payload]) -> Callable[..., Payload]:
        PAYLOADS[name] = payload
        site_task(f"train.{name}")(
            lambda site, request: plain_reply(
                payload(_in_the_clear(site, name), request), SiteJob.from_record(request.config)
            )
        )
        return payload

    return register


def clear_tokens(tokens: int, job: SiteJob) -> dict:
    """The token count a reply carries in the clear: none (0) in a secure job, where it travels only
    inside the site's masked vector, so the server learns only the survivors' total."""
    return {"tokens": 0 if job.secure else tokens}


def _in_the_clear(site: Site, name: str) -> Site:
    """The site, unless its policy requires DP (``dp-max-epsilon``): then it never sends a payload in the
    clear (:class:`~fedprune.protocols.site_policy.PolicyError`)."""
    if SitePolicy.from_node_config(site.node_config).requires_dp:
        raise PolicyError(f"site policy refuses to send train.{name} in the clear: dp-max-epsilon is set")
    return site


def plain_reply(payload: Payload, job: SiteJob) -> Reply:
    """A payload in the clear: statistics arrays as they are, masks bit-packed."""
    arrays = payload.values if payload.kind == "stats" else encode_masks(payload.values)
    return reply(arrays, clear_tokens(payload.tokens, job))


def site_number(site: Site) -> int:
    """The site's stable number across runs (its ``partition-id``; node ids change when a run restarts)."""
    node = site.node_config
    return int(node["partition-id"]) if "partition-id" in node else int(site.node_id)


@site_task("query.start")
def start(site: Site, request: Request) -> Reply:
    job = SiteJob.from_record(request.config)
    state = start_site(site_model(job), calibration_ids(job, site), job.batch_size)
    save_state(job.run_key, site.key, state)
    return reply(None, {**clear_tokens(state.tokens, job), "site": site_number(site)})


@site_task("query.resume")
def resume(site: Site, request: Request) -> Reply:
    """A resumed run asks what this site still holds for the run key: the block its inputs are of
    (-1: nothing, it must be started again), its tokens, and its next unused secure-aggregation instance."""
    job = SiteJob.from_record(request.config)
    try:
        state = load_state(job.run_key, site.key)
        block, tokens = state.block, state.tokens
    except (RuntimeError, OSError, EOFError, KeyError) as error:
        logger.info("no usable state for run %s at site %s: %s", job.run_key, site.key, error)
        block, tokens = -1, 0
    metrics = {**clear_tokens(tokens, job), "block": block, "site": site_number(site)}
    return reply(None, {**metrics, "secagg_next": secagg_mark(job.run_key, site.key)})


@site_task("query.advance")
def advance(site: Site, request: Request) -> Reply:
    """Move a restarted site's inputs past the checkpointed block edit the request carries (a resumed run
    replays the finished blocks to a site that lost its state)."""
    job, task = SiteJob.from_record(request.config), BlockTask.from_record(request.config)
    blocks = site_blocks(job)
    state = load_state(job.run_key, site.key)
    apply_update_(blocks, state, task, request.update, job.ignore)
    save_state(job.run_key, site.key, state)
    return reply(None, clear_tokens(state.tokens, job))


@site_task("query.finish")
def finish(site: Site, request: Request) -> Reply:
    drop_state(SiteJob.from_record(request.config).run_key, site.key)
    return reply(None, {"tokens": 0})
