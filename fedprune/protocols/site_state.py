"""A site's state between rounds, on the site's own disk, keyed by run and site (no Flower here).

flwr does not keep a ClientApp's process between messages (a fresh process per message under the
Deployment Engine, any free actor in simulation), so block inputs (tens of MB) live in a per-run local
folder and only small metadata travels in ``context.state``. Also a per-process cache of dense models
(in memory, or offloaded: blocks materialised per task): they are read-only here (pruned blocks are
applied to copies), so sharing them is safe; and of tokenized
documents (a simulated process serves many sites of the same corpus: tokenize it once per process).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from fedprune.data.assets import cache_root
from fedprune.data.corpus import load_works, split_works
from fedprune.data.windows import tokenize_works
from fedprune.models import load_causal_lm, load_tokenizer
from fedprune.offload import OffloadedBlocks, load_offloaded
from fedprune.sequential import BlockAccess, ResidentBlocks
from fedprune.site import SiteState

logger = logging.getLogger(__name__)

_MODELS: dict[tuple[str, str, bool], BlockAccess] = {}


def dense_blocks(path: str, dtype: str = "float32", offload: bool = False) -> BlockAccess:
    """The dense model at ``path`` and where its blocks are, loaded once per process; callers must not
    modify it. With ``offload`` its blocks stay on disk: a task materialises the block it needs (and
    releases it, so the shared model is back on ``meta`` after every task)."""
    key = (str(path), dtype, offload)
    if key not in _MODELS:
        _MODELS.clear()  # one model per process at a time
        if offload:
            _MODELS[key] = OffloadedBlocks(*load_offloaded(path, getattr(torch, dtype)))
        else:
            _MODELS[key] = ResidentBlocks(load_causal_lm(path, dtype=getattr(torch, dtype)))
    return _MODELS[key]


@lru_cache(maxsize=2)
def tokenizer_at(model_path: str):
    """The tokenizer saved beside the model at ``model_path``, loaded once per process."""
    return load_tokenizer(model_path)


@lru_cache(maxsize=2)
def tokenized_works(
    model_path: str, corpus_path: str, heldout: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """The works in ``corpus_path`` minus ``heldout``, tokenized once per process; callers must not modify
    the tensors."""
    works = load_works(corpus_path)
    if heldout:
        works, _ = split_works(works, list(heldout))
    return tokenize_works(tokenizer_at(model_path), works)


def state_dir(run_key: str, site_key: str) -> Path:
    """The folder of one site's state for one run."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{run_key}-{site_key}")
    return cache_root() / "site_state" / safe


def save_state(run_key: str, site_key: str, state: SiteState) -> None:
    """Write the state atomically (a reader never sees half a file)."""
    folder = state_dir(run_key, site_key)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    inputs = state.inputs
    payload = {
        "hidden": inputs.hidden,
        "kwargs_per_block": inputs.kwargs_per_block,
        "inputs_block": inputs.block,
    }
    payload.update(block=state.block, tokens=state.tokens)
    torch.save(payload, tmp)  # one save: a tensor shared by several blocks' kwargs is stored once
    os.replace(tmp, folder / "state.pt")


def load_state(run_key: str, site_key: str) -> SiteState:
    """Read a site's state, with a clear error if the run was never started here."""
    from fedprune.sequential import BlockInputs

    path = state_dir(run_key, site_key) / "state.pt"
    if not path.exists():
        raise RuntimeError(f"no state for run {run_key} at this site: the 'start' message never arrived")
    payload = torch.load(path, weights_only=False)
    inputs = BlockInputs(
        hidden=payload["hidden"], kwargs_per_block=payload["kwargs_per_block"], block=payload["inputs_block"]
    )
    return SiteState(inputs=inputs, block=payload["block"], tokens=payload["tokens"])


def drop_state(run_key: str, site_key: str) -> None:
    """Delete a site's state for a run."""
    shutil.rmtree(state_dir(run_key, site_key), ignore_errors=True)


_SECAGG_LEDGER = "secagg_next.json"


def secagg_mark(run_key: str, site_key: str) -> int:
    """The first secure-aggregation instance number this site has not keyed yet in this run (0 if none)."""
    path = state_dir(run_key, site_key) / _SECAGG_LEDGER
    return int(json.loads(path.read_text())["next"]) if path.exists() else 0


def reserve_instances(run_key: str, site_key: str, first: int, count: int) -> None:
    """Record that instances ``first .. first + count - 1`` get keys here; refuse a number this site
    already keyed (used, or deleted after its ``unmask``): an instance never runs twice with new keys."""
    mark = secagg_mark(run_key, site_key)
    if first < mark:
        raise ValueError(
            f"secure-aggregation instance {first} was already keyed at this site (next unused: {mark}); "
            "an instance number is never reused"
        )
    folder = state_dir(run_key, site_key)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump({"next": first + count}, handle)
    os.replace(tmp, folder / _SECAGG_LEDGER)
