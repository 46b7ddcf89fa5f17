"""HideNseek, the site's side: rebuild the frozen network from a seed, train locally, reply.

Registered as the site task ``train.hidenseek``. Every message
carries all a site needs (simulation gives clients no run config), so a site keeps no state between
rounds and a site that joins late starts from the current global model:

``config``  ``variant``, model (``arch``, ``hidden``, ``init``, ``model_seed``), data
            (``test_fraction``, ``alpha``, ``min_size``, ``data_seed``), local training (``epochs``,
            ``lr``, ``momentum``, ``batch_size``, ``init_scale``, ``optimizer``, ``seed``),
            ``aggregation``, ``round``, ``num_kept``.
``update``  ``mask``: the server's keep-mask over all prunable weights, 1 bit each (absent for dense
            FedAvg, which keeps all); then ``codes``: the global signs (or binary codes) of the kept
            weights, 1 bit each (supermask variants), ``scores``: the global scores of the kept
            weights as float32 (``aggregation=score_delta``), or ``weights``: the kept weights as
            float32 (FedAvg variants).

The frozen random weights are never sent: both ends rebuild them from ``model_seed``. The reply's
``payload`` holds ``codes`` (``ceil(num_kept / 8)`` uint8), ``delta`` (one uint8 array with
``aggregation=score_delta``: the stochastic signs of the score change, their float32 clip scale and the
``delta_topk`` fraction of largest changes exactly; :func:`fedprune.hidenseek.aggregate.pack_delta_upload`),
``scores`` (``num_kept`` float32, with ``aggregation=score_average``) or ``weights`` (``num_kept``
float32); its ``metrics`` hold
``num_examples``, ``partition_id`` and ``crc``, the CRC-32 of the ``update`` the site started from.

The wire codec (:func:`encode_mask`, :func:`decode_mask`, :func:`update_crc`) and
:func:`with_weights` are shared with the server (``fedprune/hidenseek/server.py``).
"""

from __future__ import annotations

import copy
import logging
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from fedprune.hidenseek.aggregate import (
    delta_scale,
    gather_kept,
    num_kept_weights,
    pack_delta_upload,
    pack_signs,
    scatter_kept,
    stochastic_signs,
    top_changes,
    top_count,
    unpack_signs,
)
from fedprune.hidenseek.data import DigitsSplit, dirichlet_label_partition, load_digits_split
from fedprune.hidenseek.models import build_model, prunable_weights
from fedprune.hidenseek.rounds import codes_of_scores, global_model, set_kept_scores_
from fedprune.hidenseek.sign_supermask import learned_codes, supermask_layers, train_scores
from fedprune.hidenseek.train import local_sgd
from fedprune.masks import pack_bits, unpack_bits
from fedprune.protocols.federation import Reply, Request
from fedprune.protocols.messages import MessageError, from_typed_record, typed_record
from fedprune.protocols.tasks import Site, reply, site_task

logger = logging.getLogger(__name__)

SUPERMASK_KINDS = {"sign_supermask": "sign", "binary_supermask": "binary"}
FEDAVG_VARIANTS = ("fedavg_dense", "fedavg_pruned")
VARIANTS = (*SUPERMASK_KINDS, *FEDAVG_VARIANTS)
AGGREGATIONS = ("vote", "score_average", "score_delta")
ROUND_SEED_STRIDE = 10_000  # site p in round r trains with seed + 10_000 * r + p


@dataclass(frozen=True)
class HideNseekTask:
    """What a site is sent each round (the config record, typed; validated on both sides)."""

    variant: str
    aggregation: str
    arch: str
    hidden: int
    init: str
    model_seed: int
    data_seed: int
    seed: int
    test_fraction: float
    alpha: float
    min_size: int
    epochs: int
    lr: float
    momentum: float
    batch_size: int
    init_scale: float
    optimizer: str
    delta_clip_quantile: float
    delta_topk: float
    round: int = 0
    num_kept: int = 0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise MessageError(f"task record: key 'variant': unknown {self.variant!r}; known: {VARIANTS}")
        if self.aggregation not in AGGREGATIONS:
            raise MessageError(f"task record: key 'aggregation': unknown {self.aggregation!r}")
        if self.hidden < 1 or self.epochs < 1 or self.batch_size < 1 or self.round < 0 or self.num_kept < 0:
            raise MessageError(
                "task record: hidden, epochs and batch_size must be >= 1, round and num_kept >= 0"
            )

    def to_record(self) -> dict:
        return typed_record(self)

    @classmethod
    def from_record(cls, record: Mapping) -> HideNseekTask:
        return from_typed_record(cls, record)


def encode_mask(masks: dict[str, torch.Tensor]) -> np.ndarray:
    """All keep-masks, concatenated in key order, 1 bit each: ``(ceil(total / 8),)`` uint8."""
    flat = torch.cat([mask.reshape(-1) for mask in masks.values()])  # (total,)
    return pack_bits(flat).numpy()


def decode_mask(packed: np.ndarray, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode_mask` for weights of ``shapes``; ValueError on a wrong size or dtype."""
    sizes = [int(np.prod(shape)) for shape in shapes.values()]
    flat = unpack_bits(torch.from_numpy(np.ascontiguousarray(packed)), (sum(sizes),))  # (total,) bool
    return {
        name: chunk.reshape(shape).clone()
        for (name, shape), chunk in zip(shapes.items(), torch.split(flat, sizes), strict=True)
    }


def keep_all(shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """All-True masks (dense FedAvg)."""
    return {name: torch.ones(shape, dtype=torch.bool) for name, shape in shapes.items()}


def update_crc(arrays: dict[str, np.ndarray]) -> int:
    """CRC-32 over the arrays' names and bytes in name order (what a site started its round from)."""
    crc = 0
    for name in sorted(arrays):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(np.ascontiguousarray(arrays[name]).tobytes(), crc)
    return crc


def weight_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """``"<module>.weight" -> shape`` of every prunable layer, in module order."""
    return {name: weight.shape for name, weight in prunable_weights(model).items()}


def with_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose prunable weights are ``weights`` (same names and shapes)."""
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for name, weight in prunable_weights(copied).items():
            weight.copy_(weights[name])
    return copied


def frozen_model(config: HideNseekTask) -> nn.Module:
    """The seeded random network both ends rebuild (its weights never travel)."""
    return build_model(config.arch, config.model_seed, config.init, hidden=config.hidden)


@lru_cache(maxsize=2)
def _digits(test_fraction: float, seed: int) -> DigitsSplit:
    return load_digits_split(test_fraction, seed)


def site_data(
    config: HideNseekTask, partition_id: int, num_partitions: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The site's Dirichlet(alpha) share of the digits training split: ``x (n, 64)``, ``y (n,)``."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is not in [0, {num_partitions})")
    split = _digits(config.test_fraction, config.data_seed)
    parts = dirichlet_label_partition(
        split.y_train,
        num_partitions,
        config.alpha,
        config.data_seed,
        config.min_size,
    )
    index = parts[partition_id]
    return split.x_train[index], split.y_train[index]


def _round_masks(model: nn.Module, update: dict[str, np.ndarray], num_kept: int) -> dict[str, torch.Tensor]:
    shapes = weight_shapes(model)
    masks = decode_mask(update["mask"], shapes) if "mask" in update else keep_all(shapes)
    if num_kept_weights(masks) != num_kept:
        raise ValueError(f"mask keeps {num_kept_weights(masks)} weights, config says {num_kept}")
    return masks


def start_scores(masks: dict[str, torch.Tensor], update: dict[str, np.ndarray]) -> torch.Tensor | None:
    """The global float32 scores of the kept weights (``score_delta``), or None when ``codes`` came."""
    if "scores" not in update:
        return None
    scores = update["scores"]
    if (
        scores.dtype != np.float32
        or scores.shape != (num_kept_weights(masks),)
        or not np.isfinite(scores).all()
    ):
        raise ValueError(f"scores must be finite float32 ({num_kept_weights(masks)},), got {scores.shape}")
    return torch.from_numpy(np.ascontiguousarray(scores))


def train_supermask(
    model: nn.Module,
    masks: dict[str, torch.Tensor],
    update: dict[str, np.ndarray],
    x: torch.Tensor,
    y: torch.Tensor,
    config: HideNseekTask,
    seed: int,
) -> dict[str, np.ndarray]:
    """Train scores from the global state; the reply payload for ``config.aggregation``.

    ``vote``: ``{"codes": packed signs}``; ``score_average``: ``{"scores": float32}``; ``score_delta``:
    ``{"delta": uint8}`` (:func:`pack_delta_upload`): the packed stochastic signs of the score change, their
    clip scale and the ``delta_topk`` fraction of largest changes, exact, all over the kept weights. The
    clip scale is the quantile of the other changes.
    """
    num_kept = num_kept_weights(masks)
    kind = SUPERMASK_KINDS[config.variant]
    global_scores = start_scores(masks, update)
    if global_scores is None:
        codes = unpack_signs(torch.from_numpy(np.ascontiguousarray(update["codes"])), num_kept)  # (n_kept,)
        start = global_model(model, masks, codes, kind, config.init_scale)
    else:
        start = global_model(model, masks, codes_of_scores(global_scores), kind, config.init_scale)
        set_kept_scores_(start, global_scores, masks)
    trained = train_scores(
        start,
        x,
        y,
        config.epochs,
        config.lr,
        config.batch_size,
        seed,
        config.optimizer,
        config.momentum,
    )
    scores = {key: layer.scores.detach() for key, layer in supermask_layers(trained).items()}
    if config.aggregation == "score_average":
        return {"scores": gather_kept(scores, masks).float().numpy()}
    if global_scores is not None:
        delta = gather_kept(scores, masks).float() - global_scores  # (n_kept,)
        index, values = top_changes(delta, top_count(num_kept, config.delta_topk))
        rest = torch.ones(num_kept, dtype=torch.bool)
        rest[index] = False
        scale = delta_scale(delta[rest], config.delta_clip_quantile)
        signs = stochastic_signs(delta, scale, torch.Generator().manual_seed(seed))
        return {"delta": pack_delta_upload(signs, scale, index, values)}
    return {"codes": pack_signs(gather_kept(learned_codes(trained), masks)).numpy()}


def train_weights(
    model: nn.Module,
    masks: dict[str, torch.Tensor],
    flat_weights: np.ndarray,
    x: torch.Tensor,
    y: torch.Tensor,
    config: HideNseekTask,
    seed: int,
) -> dict[str, np.ndarray]:
    """Local SGD from the global kept weights (pruned ones stay 0); ``{"weights": float32 kept}``."""
    weights = scatter_kept(torch.from_numpy(np.ascontiguousarray(flat_weights)), masks, fill=0.0)
    dense = config.variant == "fedavg_dense"
    trained = local_sgd(
        with_weights(model, weights),
        x,
        y,
        config.epochs,
        config.lr,
        config.batch_size,
        seed,
        config.momentum,
        None if dense else masks,
    )
    kept = gather_kept({k: w.detach() for k, w in prunable_weights(trained).items()}, masks)  # (n_kept,)
    return {"weights": kept.float().numpy()}


def local_round(
    config: HideNseekTask, update: dict[str, np.ndarray], x: torch.Tensor, y: torch.Tensor, partition_id: int
) -> dict[str, np.ndarray]:
    """One site's round for any variant: the reply payload."""
    variant = config.variant
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")
    model = frozen_model(config)
    masks = _round_masks(model, update, config.num_kept)
    seed = config.seed + ROUND_SEED_STRIDE * config.round + partition_id
    if variant in SUPERMASK_KINDS:
        return train_supermask(model, masks, update, x, y, config, seed)
    weights = update["weights"]
    if weights.dtype != np.float32 or weights.shape != (num_kept_weights(masks),):
        raise ValueError(
            f"weights must be float32 ({num_kept_weights(masks)},), got {weights.dtype} {weights.shape}"
        )
    return train_weights(model, masks, weights, x, y, config, seed)


@site_task("train.hidenseek")
def hidenseek_train(site: Site, request: Request) -> Reply:
    """``train.hidenseek``: one local round on the site's partition of digits."""
    config, update = HideNseekTask.from_record(request.config), dict(request.update or {})
    partition_id = int(site.node_config["partition-id"])
    x, y = site_data(config, partition_id, int(site.node_config["num-partitions"]))
    payload = local_round(config, update, x, y, partition_id)
    return reply(
        payload, {"num_examples": int(y.numel()), "partition_id": partition_id, "crc": update_crc(update)}
    )
