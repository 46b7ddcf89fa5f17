"""The fedprune Flower ClientApp: decode a message, call fedprune, encode the reply (thin).

A site never sends tokens, activations or per-sample values: only summed statistics with counts, or
bit-packed masks. Parameters travel in each message's ``config`` record (simulation gives clients no
run config). A site's private data is either its partition of the bundled corpus (``partition-id`` and
``num-partitions`` in its node config, as in simulation) or its own folder of ``<work>.txt`` files
(``data-path`` in its node config, as at a real site).

Messages
--------
``query.start``       sample the site's windows, embed them, keep block-0 inputs (sync protocols).
``train.stats``       [apply block b-1] then statistics of block b (``stats_sync``).
``train.masks``       [apply block b-1] then the site's own masks of block b (``mask_vote_sync``).
``train.local_prune`` prune a private copy of the whole model, upload all masks (``mask_vote``).
``train.secagg``      any of the three above through secure aggregation (``clients/secagg_client.py``).
``query.finish``      delete the site's state of the run.
"""

from __future__ import annotations

import json
import logging
import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import torch  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from clients.site_cache import dense_model, drop_state, load_state, save_state, tokenized_works  # noqa: E402
from fedprune.data.assets import resolve_corpus_path, resolve_model_path  # noqa: E402
from fedprune.data.sites import site_windows  # noqa: E402
from fedprune.data.windows import sample_windows  # noqa: E402
from fedprune.masks import parse_pattern  # noqa: E402
from fedprune.payload import decode_masks, decode_weights, encode_masks, encode_stats  # noqa: E402
from fedprune.pruners import get_pruner  # noqa: E402
from fedprune.site import (  # noqa: E402
    advance_site_,
    block_layer_shapes,
    local_masks,
    site_block_masks,
    site_block_stats,
    start_site,
    weights_from_masks,
)

logger = logging.getLogger(__name__)

app = ClientApp()


def _arrays(record: ArrayRecord) -> dict:
    return {key: array.numpy() for key, array in record.items()}


def site_key_of(context: Context) -> str:
    node = context.node_config
    return f"p{node['partition-id']}" if "partition-id" in node else f"n{context.node_id}"


def _calibration_ids(config: ConfigRecord, context: Context) -> torch.Tensor:
    """The site's private calibration windows ``(windows, seq_len)``."""
    model_path = str(resolve_model_path(str(config["model"])))
    node = context.node_config
    seq_len, total, seed = int(config["seq_len"]), int(config["total_windows"]), int(config["seed"])
    if "data-path" in node:  # a real site: all of its own works are calibration data
        docs = tokenized_works(model_path, str(node["data-path"]))
        count = max(1, total // int(config["num_sites"]))
        return sample_windows(docs, count, seq_len, seed)
    corpus = str(resolve_corpus_path(str(config["corpus"])))
    docs = tokenized_works(model_path, corpus, tuple(config["heldout"]))
    site, num_sites = int(node["partition-id"]), int(node["num-partitions"])
    return site_windows(str(config["partitioner"]), docs, site, num_sites, total, seq_len, seed)


def _model(config: ConfigRecord) -> torch.nn.Module:
    """The dense model named in the message (a bundled name or a folder at this site)."""
    return dense_model(str(resolve_model_path(str(config["model"]))), str(config["dtype"]))


def _pruner(config: ConfigRecord):
    return get_pruner(str(config["pruner"]), **json.loads(str(config["pruner_params"])))


def _apply_update_(model, state, config: ConfigRecord, content: RecordDict) -> None:
    """Move past block b-1 if the message carries its globally pruned version."""
    if "update" not in content:
        return
    block = int(config["block"]) - 1
    shapes = block_layer_shapes(model, block)
    arrays = _arrays(content["update"])
    if str(config["update_kind"]) == "masks":
        weights = weights_from_masks(model, block, decode_masks(arrays, shapes))
    else:
        weights = decode_weights(arrays, shapes)
    advance_site_(model, state, block, weights)


def _reply(msg: Message, arrays: dict | None, metrics: dict) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays is not None:
        content["payload"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return Message(content, reply_to=msg)


@app.query("start")
def start(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    model = _model(config)
    state = start_site(model, _calibration_ids(config, context), int(config["batch_size"]))
    save_state(str(config["run_key"]), site_key_of(context), state)
    return _reply(msg, None, {"tokens": state.tokens})


def block_payload(msg: Message, context: Context, compute) -> tuple[dict, int]:
    """[Apply block b-1], then ``compute(model, state, config)``: the payload arrays and the site's tokens."""
    config = msg.content["config"]
    run_key, site_key = str(config["run_key"]), site_key_of(context)
    model = _model(config)
    state = load_state(run_key, site_key)
    _apply_update_(model, state, config, msg.content)
    arrays = compute(model, state, config)
    save_state(run_key, site_key, state)
    return arrays, state.tokens


def _block_round(msg: Message, context: Context, compute) -> Message:
    arrays, tokens = block_payload(msg, context, compute)
    return _reply(msg, arrays, {"tokens": tokens})


def stats_payload(model, state, config, token_bound: float | None = None) -> dict:
    """This site's statistics of block ``config['block']`` as ``encode_stats`` arrays."""
    block, kind = int(config["block"]), str(config["stat_kind"])
    return encode_stats(site_block_stats(model, state, block, kind, token_bound))


def masks_payload(model, state, config) -> dict[str, torch.Tensor]:
    """This site's own keep-masks of block ``config['block']``."""
    pattern = parse_pattern(str(config["pattern"]))
    return site_block_masks(
        model, state, int(config["block"]), _pruner(config), float(config["sparsity"]), pattern
    )


def local_prune_payload(msg: Message, context: Context) -> tuple[dict[str, torch.Tensor], int]:
    """This site's keep-masks of its privately pruned whole model, and its tokens."""
    config = msg.content["config"]
    calib_ids = _calibration_ids(config, context)
    all_masks = local_masks(
        _model(config),
        calib_ids,
        _pruner(config),
        float(config["sparsity"]),
        parse_pattern(str(config["pattern"])),
        int(config["batch_size"]),
    )
    return all_masks, int(calib_ids.numel())


@app.train("stats")
def stats(msg: Message, context: Context) -> Message:
    return _block_round(msg, context, stats_payload)


@app.train("masks")
def masks(msg: Message, context: Context) -> Message:
    return _block_round(msg, context, lambda *args: encode_masks(masks_payload(*args)))


@app.train("local_prune")
def local_prune(msg: Message, context: Context) -> Message:
    all_masks, tokens = local_prune_payload(msg, context)
    return _reply(msg, encode_masks(all_masks), {"tokens": tokens})


@app.query("finish")
def finish(msg: Message, context: Context) -> Message:
    drop_state(str(msg.content["config"]["run_key"]), site_key_of(context))
    return _reply(msg, None, {"tokens": 0})


import clients.hidenseek_client  # noqa: E402,F401  (registers hidenseek handlers)
import clients.secagg_client  # noqa: E402,F401  (registers the secure-aggregation handler)
