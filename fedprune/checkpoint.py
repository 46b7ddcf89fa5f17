"""Per-block checkpoints of a run, so that a killed coordinator can continue (``resume=true``).

A run writes ``<out_dir>/checkpoint/`` as it goes: after every finished block, that block's pruned
tensors (``block_<b>.safetensors``) and, for a federated run, its edit as it travels to the sites
(``edit_<b>.safetensors``), each written atomically; then ``state.json`` (atomically, last), which names
the finished blocks, the run's config fingerprint, its run key and the protocol's state (JSON). A block
file that ``state.json`` does not name is ignored, so a kill at any moment leaves a consistent
checkpoint. The folder is deleted once the run's outputs are complete.

Resuming reads ``state.json`` and refuses (:class:`~fedprune.config.ConfigError` naming ``resume``)
when there is none, or when the config differs from the checkpoint's (naming the differing keys).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedprune.config import ConfigError, JobConfig
from fedprune.outputs import save_tensors_atomic, write_json_atomic

logger = logging.getLogger(__name__)

FOLDER = "checkpoint"
STATE = "state.json"
VERSION = 1
# keys that do not change what a run computes: they may differ between the killed run and its resume
UNCHECKED_KEYS = ("resume", "progress", "threads")
_MISSING = "<not set>"


def checkpoint_dir(out_dir: Path) -> Path:
    """The checkpoint folder of a run."""
    return Path(out_dir) / FOLDER


def fingerprint(job: JobConfig) -> dict[str, object]:
    """The job's config as flat ``"group.key" -> JSON value``, without :data:`UNCHECKED_KEYS`."""
    flat: dict[str, object] = {}

    def walk(prefix: str, value: object) -> None:
        if is_dataclass(value) and not isinstance(value, type):
            value = {f.name: getattr(value, f.name) for f in fields(value)}
        if isinstance(value, Mapping) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
            return
        flat[prefix] = json.loads(json.dumps(value, default=str))

    walk("", job)
    return {key: value for key, value in flat.items() if key not in UNCHECKED_KEYS}


def differing_keys(saved: Mapping[str, object], now: Mapping[str, object]) -> list[str]:
    """The keys whose values differ between two fingerprints (sorted)."""
    return sorted(k for k in set(saved) | set(now) if saved.get(k, _MISSING) != now.get(k, _MISSING))


@dataclass(frozen=True)
class Checkpoint:
    """A run's last checkpoint: its folder, run key, finished blocks (in order) and protocol state."""

    folder: Path
    run_key: str
    blocks: tuple[int, ...]
    state: dict

    def tensors(self, block: int) -> dict[str, torch.Tensor]:
        """The pruned tensors of finished ``block`` (its ``state_dict``)."""
        from safetensors.torch import load_file

        return load_file(self.folder / f"block_{block}.safetensors")

    def edit_arrays(self, block: int) -> dict[str, np.ndarray]:
        """The edit of finished ``block`` as it travels to the sites."""
        from safetensors.numpy import load_file

        return load_file(self.folder / f"edit_{block}.safetensors")


def clear(out_dir: Path) -> None:
    """Delete a run's checkpoint (a fresh run, or outputs complete)."""
    shutil.rmtree(checkpoint_dir(out_dir), ignore_errors=True)


def save_block(
    out_dir: Path, block: int, module: nn.Module, edit: Mapping[str, np.ndarray] | None = None
) -> None:
    """Write finished ``block``'s tensors (and its encoded edit) atomically; :func:`save_state` next."""
    folder = checkpoint_dir(out_dir)
    tensors = {name: t.detach().clone() for name, t in module.state_dict().items()}
    save_tensors_atomic(folder / f"block_{block}.safetensors", tensors)
    if edit is not None:
        _save_arrays_atomic(folder / f"edit_{block}.safetensors", edit)


def _save_arrays_atomic(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({name: np.ascontiguousarray(a) for name, a in arrays.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_state(out_dir: Path, job: JobConfig, run_key: str, blocks: list[int], state: dict) -> None:
    """Write ``state.json`` atomically: from now on the checkpoint covers ``blocks``."""
    record = {
        "version": VERSION,
        "config": fingerprint(job),
        "run_key": run_key,
        "blocks": [int(b) for b in blocks],
        "state": state,
    }
    write_json_atomic(checkpoint_dir(out_dir) / STATE, record)
    logger.info("checkpoint: blocks %s finished", blocks)


def restore_block_(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy a finished block's checkpointed tensors into ``module`` (every tensor, exactly)."""
    module.load_state_dict(dict(tensors), strict=True)


def load_checkpoint(out_dir: Path, job: JobConfig) -> Checkpoint:
    """The run's checkpoint to resume from; :class:`ConfigError` naming ``resume`` when there is none
    or when it was written with a different config (the differing keys are named)."""
    folder = checkpoint_dir(out_dir)
    path = folder / STATE
    if not path.is_file():
        done = (Path(out_dir) / "metrics.json").is_file()
        why = "the run there already finished" if done else "no block of a run there had finished"
        raise ConfigError(
            f"config key 'resume': no checkpoint in {folder} ({why}); run without resume=true, or give "
            "the killed run's folder (hydra.run.dir=...)"
        )
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("version") != VERSION:
        raise ConfigError(f"config key 'resume': checkpoint {path} has version {record.get('version')}")
    saved, now = record["config"], fingerprint(job)
    differ = differing_keys(saved, now)
    if differ:
        detail = "; ".join(f"{k}: {saved.get(k, _MISSING)!r} -> {now.get(k, _MISSING)!r}" for k in differ)
        raise ConfigError(
            f"config key 'resume': the checkpoint in {folder} is of a different config ({detail}); rerun "
            f"the same command, or start afresh without resume=true (differing keys: {', '.join(differ)})"
        )
    return Checkpoint(
        folder, str(record["run_key"]), tuple(int(b) for b in record["blocks"]), record["state"]
    )


def begin(out_dir: Path, job: JobConfig) -> Checkpoint | None:
    """The checkpoint to continue from (``resume=true``), else None after deleting any stale one."""
    if job.resume:
        return load_checkpoint(out_dir, job)
    clear(out_dir)
    return None
