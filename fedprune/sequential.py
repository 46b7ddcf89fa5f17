"""The one layer-by-layer driver, used by centralized pruning, clients and the server.

Steps, each its own function, so that the federation can split them between sites and server:

1. :func:`capture_block_inputs` — embed the calibration windows; record the inputs of block 0 and the
   keyword arguments of every block.
2. :func:`collect_block_stats` — run the dense block with hooks; per prunable layer, summed statistics.
3. :func:`prune_block_` — prune every prunable layer of the block from its statistics.
4. :func:`run_block` — re-run the pruned block: the inputs of the next block (with its own kwargs).

Layers matched by ``ignore`` patterns (see :mod:`fedprune.models`) are skipped by every step: no statistics,
weights untouched. The block-level functions take ``block_prefix`` (``"model.layers.3"``) so that qualified
patterns match; :func:`prune_model_` first runs :func:`fedprune.models.check_prunable`.

Memory: the model plus one block's inputs and outputs for the whole calibration set, and every block's
keyword arguments (references: blocks given the same mask or position embeddings share one tensor).
Where the blocks live is a :class:`BlockAccess`: in memory (:class:`ResidentBlocks`, the default) or on
disk, materialised one at a time (:class:`fedprune.offload.OffloadedBlocks`, ``model.offload=true``);
then the driver holds the weights outside the blocks plus one block.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from fedprune.allocation import Allocation, as_allocation, qualified
from fedprune.allocation_rules import Allocated, AllocationRule, allocated
from fedprune.cpu_attention import chunked_causal_attention
from fedprune.cpu_linear import onednn_linears
from fedprune.masks import Pattern, sparsity_of
from fedprune.models import (
    apply_weights_,
    check_prunable,
    find_blocks,
    find_prunable_layers,
    get_weight,
    input_device,
)
from fedprune.pruners.base import Pruner, PruneResult, check_pruner_supports
from fedprune.secure.dp import clip_tokens
from fedprune.stat_kinds import StatKind, at_least_float32, get_stat_kind
from fedprune.stats import BlockStats, Stats, token_count
from fedprune.structured.decide import DepthPlan, Structure
from fedprune.structured.depth import (
    Influence,
    block_influence,
    influence_stats,
    remove_attention_,
    remove_blocks_,
)

logger = logging.getLogger(__name__)


class BlockAccess(Protocol):
    """Where the decoder blocks of ``model`` live: ``load(i)`` makes block i usable (in the model's own
    block list) and returns it; ``unload(i, block, save)`` is called once its step is done (``save``:
    the step succeeded, its weights are final); ``copy(i)`` is a private copy of block i;
    ``outside_idle()`` is a context in which only blocks run, so the weights outside them may be set aside."""

    model: nn.Module

    def load(self, index: int) -> nn.Module: ...

    def unload(self, index: int, block: nn.Module, save: bool) -> None: ...

    def copy(self, index: int) -> nn.Module: ...

    def outside_idle(self) -> AbstractContextManager[None]: ...


@dataclass
class ResidentBlocks:
    """The blocks of a model held in memory: ``load`` gives the block itself, ``unload`` does nothing."""

    model: nn.Module

    def load(self, index: int) -> nn.Module:
        return find_blocks(self.model)[1][index]

    def unload(self, index: int, block: nn.Module, save: bool) -> None:
        pass

    def copy(self, index: int) -> nn.Module:
        return copy.deepcopy(self.load(index))

    def outside_idle(self) -> AbstractContextManager[None]:
        return nullcontext()


@contextmanager
def held_block(blocks: BlockAccess, index: int) -> Iterator[nn.Module]:
    """Block ``index`` loaded for the duration of the ``with`` body, then unloaded (saved on success)."""
    block = blocks.load(index)
    try:
        yield block
    except BaseException:
        blocks.unload(index, block, save=False)
        raise
    blocks.unload(index, block, save=True)


@dataclass
class BlockInputs:
    """Inputs of decoder block ``block`` for the calibration set, in micro-batches.

    ``hidden[i]`` is ``(batch, tokens, hidden)``; ``kwargs_per_block[b][i]`` are the keyword arguments the
    model passes to block ``b`` for micro-batch ``i`` (attention mask, position embeddings, ...), recorded
    for every block at capture: models with per-layer attention types (``config.layer_types``) give blocks
    different masks. A tensor the model passes to several blocks is one shared object here.
    """

    hidden: list[torch.Tensor]
    kwargs_per_block: list[list[dict]]  # block -> micro-batch -> kwargs
    block: int

    @property
    def kwargs(self) -> list[dict]:
        """Per micro-batch, the keyword arguments of block ``block``."""
        if not 0 <= self.block < len(self.kwargs_per_block):
            raise IndexError(f"no block {self.block}: the model has {len(self.kwargs_per_block)} blocks")
        return self.kwargs_per_block[self.block]

    @property
    def num_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


class _StopForward(Exception):
    """Raised during capture to stop the model once the last block's call is recorded."""


_CACHE_KWARGS = ("past_key_value", "past_key_values", "cache", "layer_past")


def _detach_value(value: object, memo: dict[int, tuple[object, object]]) -> object:
    """``value`` detached (tensors and tuples of tensors), once per object: shared inputs stay shared.

    ``memo``: ``id(original) -> (original, kept alive so its id is not reused; detached)``.
    """
    is_tensor = isinstance(value, torch.Tensor)
    if not is_tensor and not (isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value)):
        return value
    if id(value) not in memo:
        detached = value.detach() if is_tensor else tuple(_detach_value(v, memo) for v in value)
        memo[id(value)] = (value, detached)
    return memo[id(value)][1]


def _detach_kwargs(kwargs: dict, memo: dict[int, tuple[object, object]]) -> dict:
    """Keyword arguments of a block call, without caches and with tensors detached (via ``memo``)."""
    out = {key: _detach_value(value, memo) for key, value in kwargs.items() if key not in _CACHE_KWARGS}
    out["use_cache"] = False
    return out


def micro_batches(input_ids: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    """Split ``(windows, tokens)`` ids into micro-batches of at most ``batch_size`` windows."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return input_ids.split(batch_size, dim=0)


def _positional_names(block: nn.Module) -> list[str]:
    """Names of the block's ``forward`` parameters that can be given by position (after ``self``)."""
    names = []
    for parameter in inspect.signature(type(block).forward).parameters.values():
        if parameter.kind not in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            break
        names.append(parameter.name)
    return names[1:]


def _recording_forward(
    index: int, last: int, hidden: list[torch.Tensor], kwargs_list: list[dict], memo: dict, names: list[str]
) -> Callable:
    """A stand-in ``forward`` for block ``index``: records its call and returns its input unchanged.

    Arguments the model passes by position after the hidden states (GPT-2 passes its attention mask
    that way) are recorded under their parameter ``names``, so re-running the block gets them too.
    """

    def forward(*args: object, **kwargs: object) -> torch.Tensor:
        states = args[0] if args else kwargs.pop("hidden_states")  # (batch, tokens, hidden)
        if index == 0:
            hidden.append(states.detach())
        named = dict(zip(names[1:], args[1:], strict=False))  # names[0] is the hidden states
        if len(args) > len(names):
            raise RuntimeError(
                f"decoder block {index} got {len(args)} positional arguments, cannot name them"
            )
        kwargs = {**named, **{k: v for k, v in kwargs.items() if k != "hidden_states"}}
        kwargs_list.append(_detach_kwargs(kwargs, memo))
        if index == last:
            raise _StopForward
        return states

    return forward


@contextmanager
def replaced_forwards(blocks: Sequence[nn.Module], forwards: Sequence[Callable]) -> Iterator[None]:
    """Each block's ``forward`` replaced by a stand-in for the ``with`` body, then restored (instance-level
    forwards, e.g. accelerate's hooks, included)."""
    saved = [vars(block).get("forward") for block in blocks]
    for block, forward in zip(blocks, forwards, strict=True):
        block.forward = forward
    try:
        yield
    finally:
        for block, forward in zip(blocks, saved, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int) -> BlockInputs:
    """Record the inputs of block 0 and every block's keyword arguments for ``input_ids`` ``(windows, tokens)``.

    Meanwhile each block's ``forward`` only records its call and passes its input on (no block compute,
    so blocks may be on the ``meta`` device); the model stops at the last block.
    """
    _, blocks = find_blocks(model)
    hidden: list[torch.Tensor] = []
    kwargs_per_block: list[list[dict]] = [[] for _ in blocks]
    memo: dict[int, tuple[object, object]] = {}
    last = len(blocks) - 1
    forwards = [
        _recording_forward(index, last, hidden, kwargs_per_block[index], memo, _positional_names(block))
        for index, block in enumerate(blocks)
    ]
    device = input_device(model)
    try:
        with replaced_forwards(blocks, forwards):
            for count, batch in enumerate(micro_batches(input_ids, batch_size), start=1):
                memo.clear()
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _StopForward:
                    pass
                missed = [i for i, kw in enumerate(kwargs_per_block) if len(kw) != count]
                if missed:
                    raise RuntimeError(f"decoder blocks {missed} were not called exactly once per forward")
    finally:
        memo.clear()
    return BlockInputs(hidden=hidden, kwargs_per_block=kwargs_per_block, block=0)


def _block_output(output: object) -> torch.Tensor:
    """The hidden states a decoder block returns (a tensor, or the first element of a tuple)."""
    return output[0] if isinstance(output, tuple | list) else output


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> BlockInputs:
    """Run ``block`` (block ``inputs.block``) on every micro-batch: the inputs of the next block, with its
    own keyword arguments (after the last block: its outputs)."""
    with onednn_linears(block), chunked_causal_attention(block):
        hidden = [_block_output(block(h, **kw)) for h, kw in zip(inputs.hidden, inputs.kwargs, strict=True)]
    return BlockInputs(hidden=hidden, kwargs_per_block=inputs.kwargs_per_block, block=inputs.block + 1)


@torch.no_grad()
def collect_block_stats(
    block: nn.Module,
    inputs: BlockInputs,
    stat_kind: str | StatKind | None,
    token_bound: float | None = None,
    ignore: Sequence[str] = (),
    block_prefix: str = "",
) -> BlockStats:
    """Summed statistics of the inputs of each prunable layer of ``block`` (empty if data-free).

    Layers fed the very same tensor (q/k/v, gate/up) share one computation and one :class:`Stats`
    object: they form one of the result's ``groups``. The first micro-batch runs the whole block and
    records the order in which the prunable layers are called; later micro-batches stop as soon as the
    last of them has its input (its own product and the rest of the block are not needed). With
    ``token_bound`` (differential privacy), each token's input vector is first clipped to that L2 norm
    (the block itself runs unchanged). Layers matched by ``ignore`` get no hook and no statistics.
    """
    if stat_kind is None:
        return BlockStats({})
    layers = find_prunable_layers(block, ignore, block_prefix)
    spec = get_stat_kind(stat_kind)
    totals: dict[str, torch.Tensor] = {}  # by first layer of a group: the running sum (spec.accumulate_)
    counts: dict[str, int] = {}
    owner: dict[str, str] = {}  # layer -> first layer seen with the same input tensor
    order: list[str] = []  # call order of the prunable layers in the first micro-batch
    # set after micro-batch 1: the layer after whose input the block may stop ("" = run whole block)
    last: list[str] = []
    # per micro-batch: id(input tensor) -> (the tensor, kept alive so its id is not reused; first layer)
    seen: dict[int, tuple[torch.Tensor, str]] = {}

    def make_hook(name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            if not last:
                order.append(name)
            first = seen[id(x)][1] if id(x) in seen else name
            if owner.setdefault(name, first) != first:
                raise RuntimeError(f"layer {name!r} shares its input differently across micro-batches")
            if first == name:
                seen[id(x)] = (x, name)
                # as it is (each kind computes at least in float32; bfloat16 Gram sums through the
                # kernel), or clipped in float32: a bfloat16 rounding could exceed the bound
                xs = x if token_bound is None else clip_tokens(at_least_float32(x), token_bound)
                totals[name] = spec.accumulate_(totals.get(name), xs)
                counts[name] = counts.get(name, 0) + token_count(xs)
            if last and name == last[0]:
                raise _StopForward

        return hook

    handles = [layer.register_forward_pre_hook(make_hook(name)) for name, layer in layers.items()]
    with onednn_linears(block), chunked_causal_attention(block):
        try:
            for h, kw in zip(inputs.hidden, inputs.kwargs, strict=True):
                seen.clear()
                try:
                    block(h, **kw)
                except _StopForward:
                    pass
                if not last:
                    last.append(order[-1] if _called_once_each(order, layers) else "")
        finally:
            for handle in handles:
                handle.remove()
    seen.clear()
    collected = {name: Stats(spec.name, spec.finish_(total), counts[name]) for name, total in totals.items()}
    return _shared_inputs(collected, owner, [name for name in layers if name in owner])


def _shared_inputs(collected: dict[str, Stats], owner: dict[str, str], order: list[str]) -> BlockStats:
    """Group each layer with the first layer fed its input (``owner``), whose statistics it shares."""
    groups: dict[str, list[str]] = {}
    for name in order:
        groups.setdefault(owner[name], []).append(name)
    return BlockStats({tuple(group): collected[first] for first, group in groups.items()}, order=order)


def _called_once_each(order: list[str], layers: dict[str, nn.Module]) -> bool:
    """True if every prunable layer ran exactly once in one block call (then early stop is safe)."""
    if len(order) == len(set(order)) == len(layers):
        return True
    logger.info("prunable layers ran %s in one block call: no early stop", order)
    return False


def prune_layers(
    block: nn.Module,
    stats: dict[str, Stats],
    pruner: Pruner,
    sparsity: float | Allocation,
    pattern: Pattern,
    ignore: Sequence[str] = (),
    block_prefix: str = "",
) -> dict[str, PruneResult]:
    """Pruned weights and masks of each prunable, not ignored layer of ``block`` (the block is not
    modified); ``sparsity``: one for all layers, or an :class:`Allocation` by qualified layer name."""
    allocation = as_allocation(sparsity)
    results = {}
    for name, layer in find_prunable_layers(block, ignore, block_prefix).items():
        layer_sparsity = allocation.of(qualified(block_prefix, name))
        results[name] = pruner.prune(get_weight(layer), stats.get(name), layer_sparsity, pattern)
    return results


def prune_block_(
    block: nn.Module,
    stats: dict[str, Stats],
    pruner: Pruner,
    sparsity: float,
    pattern: Pattern,
    ignore: Sequence[str] = (),
    block_prefix: str = "",
) -> dict[str, torch.Tensor]:
    """Prune ``block`` in place (ignored layers untouched); return the keep-masks by layer name."""
    results = prune_layers(block, stats, pruner, sparsity, pattern, ignore, block_prefix)
    apply_weights_(block, {name: r.weight for name, r in results.items()})
    return {name: r.mask for name, r in results.items()}


@dataclass
class PruneReport:
    """Per-layer sparsity (``"<blocks>.<block>.<layer>"`` -> fraction of weights removed), calibration tokens, the
    keep-masks by ``"<block>.<layer>"`` when asked for, and the prunable layers left dense by ``ignore``
    (``"<blocks>.<block>.<layer>"``; overall sparsity and coverage: :func:`fedprune.models.sparsity_report`)."""

    layer_sparsity: dict[str, float] = field(default_factory=dict)
    calib_tokens: int = 0
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    ignored_layers: list[str] = field(default_factory=list)
    edits: dict[int, object] = field(default_factory=dict)  # structured: each block's StructuredEdit
    depth: object = None  # structured: the DepthPlan (removed blocks and attention sublayers), if any
    allocation: Allocated | None = None  # a non-uniform allocation rule's result (OWL), if any


class BlockCheckpoints(Protocol):
    """Where :func:`prune_model_` saves each pruned block and restores the finished ones from (a resumed
    run): blocks ``0 .. finished - 1`` are restored, not pruned."""

    finished: int

    def restore_(self, index: int, block: nn.Module, report: PruneReport) -> None:
        """Make ``block`` the checkpointed pruned block ``index``; record its removals in ``report``."""

    def save(self, index: int, block: nn.Module, report: PruneReport) -> None:
        """Save pruned block ``index`` (``report``: what was removed so far)."""


def prune_model_(
    model: nn.Module,
    input_ids: torch.Tensor,
    pruner: Pruner,
    sparsity: float,
    pattern: Pattern,
    batch_size: int = 8,
    progress: bool = True,
    keep_masks: bool = False,
    ignore: Sequence[str] = (),
    blocks: BlockAccess | None = None,
    structure: Structure | None = None,
    allocation: AllocationRule | None = None,
    checkpoints: BlockCheckpoints | None = None,
) -> PruneReport:
    """Centralized sequential pruning of every decoder block of ``model`` in place.

    Parameters
    ----------
    input_ids : ``(windows, tokens)`` calibration windows (ignored by data-free pruners).
    ignore : layer-name patterns left dense on purpose; checked first by
        :func:`fedprune.models.check_prunable`, which also refuses block weights nothing can prune.
    blocks : where the blocks live (default: in memory). Each block is loaded for its step (statistics,
        pruning, the next block's inputs) and unloaded after it (an offloaded block is saved, then released).
    structure : with ``pattern`` structured: the units removed from every block; each block becomes
        physically smaller (its :class:`fedprune.edits.StructuredEdit`) before it computes the next inputs.
    allocation : a rule deciding each block's sparsity (default: ``sparsity`` everywhere); one that needs
        statistics of the dense model gets them from one dense pass first (:func:`collect_dense_stats`).
    checkpoints : each pruned block is saved there; the first ``checkpoints.finished`` blocks are restored
        from there instead (a resumed run), and the next block's inputs come from the restored blocks.
    """
    check_pruner_supports(pruner, pattern)
    if (pattern.kind == "structured") != (structure is not None):
        raise ValueError("pattern 'structured' goes with a structure, and only it")
    check_prunable(model, ignore)
    access = blocks if blocks is not None else ResidentBlocks(model)
    blocks_name, block_list = find_blocks(model)
    report = PruneReport()
    influence_needed = structure is not None and structure.needs_influence(pruner)
    dense_kind = allocation.dense_stat_kind if allocation is not None else None
    needs_inputs = bool(pruner.stat_kind) or influence_needed or dense_kind is not None
    inputs = capture_block_inputs(model, input_ids, batch_size) if needs_inputs else None
    report.calib_tokens = inputs.num_tokens if inputs else 0
    if allocation is not None:
        dense = collect_dense_stats(access, inputs, dense_kind, ignore, blocks_name) if dense_kind else None
        report.allocation = allocate(allocation, access, dense, sparsity, ignore)
        sparsity = report.allocation.allocation
    plan = DepthPlan()
    if structure is not None and structure.removes_depth:
        influence = collect_influence(access, inputs, structure.family) if influence_needed else None
        plan = structure.depth_plan(influence, model, pruner)
        report.depth = plan
    with access.outside_idle():  # only blocks run: embeddings and head may be set aside
        for index in tqdm(range(len(block_list)), desc=f"pruning ({pruner.name})", disable=not progress):
            prefix = f"{blocks_name}.{index}"
            if index in plan.blocks:  # removed: the next block gets this block's inputs
                if inputs is not None:
                    inputs = BlockInputs(inputs.hidden, inputs.kwargs_per_block, index + 1)
                continue
            with held_block(access, index) as block:
                if checkpoints is not None and index < checkpoints.finished:
                    checkpoints.restore_(index, block, report)
                else:
                    _prune_one_block_(
                        block,
                        index,
                        prefix,
                        inputs,
                        pruner,
                        sparsity,
                        pattern,
                        ignore,
                        structure,
                        plan,
                        report,
                        keep_masks,
                    )
                    if checkpoints is not None:
                        checkpoints.save(index, block, report)
                if inputs is not None and index + 1 < len(block_list):
                    inputs = run_block(block, inputs)
    remove_blocks_(model, plan.blocks)
    return report


def _prune_one_block_(
    block: nn.Module,
    index: int,
    prefix: str,
    inputs: BlockInputs | None,
    pruner: Pruner,
    sparsity: float | Allocation,
    pattern: Pattern,
    ignore: Sequence[str],
    structure: Structure | None,
    plan: DepthPlan,
    report: PruneReport,
    keep_masks: bool,
) -> None:
    """One step of :func:`prune_model_`: block ``index`` pruned in place from its statistics on
    ``inputs``; what it removed recorded in ``report``."""
    if index in plan.attention:
        remove_attention_(block, structure.family)
    stats = (
        collect_block_stats(block, inputs, pruner.stat_kind, None, ignore, prefix)
        if inputs is not None and pruner.stat_kind
        else {}
    )
    if structure is not None:
        edit = structure.edit(block, stats, pruner, attention=index not in plan.attention)
        edit.apply_(block)
        report.edits[index] = edit
        report.layer_sparsity.update({f"{prefix}.{n}": f for n, f in edit.report().items()})
        masks = {}
    else:
        masks = prune_block_(block, stats, pruner, sparsity, pattern, ignore, prefix)
        report.ignored_layers += [f"{prefix}.{n}" for n in find_prunable_layers(block) if n not in masks]
    for name, mask in masks.items():
        report.layer_sparsity[f"{prefix}.{name}"] = sparsity_of(mask)
        if keep_masks:
            report.masks[f"{index}.{name}"] = mask


@torch.no_grad()
def collect_dense_stats(
    access: BlockAccess,
    inputs: BlockInputs,
    stat_kind: str,
    ignore: Sequence[str] = (),
    blocks_name: str = "",
    token_bound: float | None = None,
) -> list[BlockStats]:
    """One pass of the dense model from the block-0 ``inputs``: every block's statistics (for an
    allocation rule), by block."""
    collected, current = [], inputs
    count = len(inputs.kwargs_per_block)
    for index in range(count):
        with held_block(access, index) as block:
            prefix = qualified(blocks_name, str(index))
            collected.append(collect_block_stats(block, current, stat_kind, token_bound, ignore, prefix))
            if index + 1 < count:
                current = run_block(block, current)
    return collected


def allocate(
    rule: AllocationRule,
    access: BlockAccess,
    dense: Sequence[BlockStats] | None,
    sparsity: float,
    ignore: Sequence[str] = (),
) -> Allocated:
    """The rule's allocation for the dense blocks of ``access`` (each loaded in turn for its score) with
    their dense statistics ``dense`` (by block; None if the rule needs none)."""
    blocks_name, block_list = find_blocks(access.model)
    scores, layers = [], []
    for index in range(len(block_list)):
        prefix = f"{blocks_name}.{index}"
        with held_block(access, index) as block:
            weights = {n: get_weight(m) for n, m in find_prunable_layers(block, ignore, prefix).items()}
            scores.append(rule.block_score(weights, dense[index] if dense is not None else {}))
        layers.append((prefix, {name: w.numel() for name, w in weights.items()}))
        del weights
    return allocated(rule, sparsity, scores, layers)


@torch.no_grad()
def collect_influence(access: BlockAccess, inputs: BlockInputs, family) -> Influence:
    """One pass of the dense model from the block-0 ``inputs``: every block's and attention sublayer's
    summed influence (:mod:`fedprune.structured.depth`)."""
    block_sums, attention_sums = [], []
    current = inputs
    for index in range(len(current.kwargs_per_block)):
        with held_block(access, index) as block:
            b, a, hidden = block_influence(block, family, current.hidden, current.kwargs)
        block_sums.append(b)
        attention_sums.append(a)
        current = BlockInputs(hidden, current.kwargs_per_block, index + 1)
    return influence_stats(block_sums, attention_sums, inputs.num_tokens)
