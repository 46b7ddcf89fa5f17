"""The typed schema of what an LLM site is sent: one dataclass per part, each with ``to_record`` /
``from_record`` (flat values a Flower ConfigRecord holds) and validated on both sides.

A record is the merge of the parts a task needs: :class:`SiteJob` (every message), :class:`MethodSpec`
(pruning tasks), :class:`BlockTask` (per-block tasks). ``from_record`` raises :class:`MessageError`
naming the key when one is missing or malformed, so a drifted key fails at once, on either side.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import get_type_hints

from fedprune.config import AllocationSpec, JobConfig, target_sparsity
from fedprune.edits import EDITS
from fedprune.stat_kinds import STAT_KINDS

logger = logging.getLogger(__name__)


class MessageError(ValueError):
    """A task record that does not follow the schema; the message names the key."""


def _read(record: Mapping, key: str, kind: type):
    if key not in record:
        raise MessageError(f"task record: missing key {key!r}")
    value = record[key]
    try:
        if kind is tuple:
            if isinstance(value, str | bytes):
                raise TypeError("expected a list")
            return tuple(str(v) for v in value)
        if kind in (int, float) and isinstance(value, bool):
            raise TypeError("expected a number")
        if kind is bool and not isinstance(value, bool):
            raise TypeError("expected true or false")
        return kind(value)
    except (TypeError, ValueError) as error:
        raise MessageError(f"task record: key {key!r} = {value!r}: {error}") from None


def typed_record(obj) -> dict:
    """A flat record of a dataclass of scalars and tuples (tuples as lists), in field order."""
    return {f.name: list(v) if isinstance(v := getattr(obj, f.name), tuple) else v for f in fields(obj)}


def from_typed_record(cls, record: Mapping):
    """The dataclass ``cls`` from a record, each field read with its annotated type (int, float, str,
    bool, tuple of str); :class:`MessageError` names a missing or malformed key."""
    hints = get_type_hints(cls)
    kinds = {name: tuple if str(hint).startswith("tuple") else hint for name, hint in hints.items()}
    return cls(**{f.name: _read(record, f.name, kinds[f.name]) for f in fields(cls)})


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise MessageError(f"task record: key {key!r}: {message}")


_SENT_WHEN_SET = ("ignore", "offload", "secure")  # SiteJob keys left out of a record at their default


@dataclass(frozen=True)
class SiteJob:
    """What every site needs for an LLM job: the model, its corpus and how its windows are drawn."""

    run_key: str
    model: str  # a bundled model name or a folder at the site
    dtype: str
    corpus: str  # a bundled corpus (simulated sites); a real site reads its own folder
    heldout: tuple[str, ...]
    seq_len: int
    total_windows: int  # over all sites
    partitioner: str
    num_sites: int
    seed: int
    batch_size: int
    ignore: tuple[str, ...] = ()  # layer-name patterns left dense (sent only when not empty)
    offload: bool = False  # decoder blocks loaded one at a time at the site (sent only when true)
    # sums go through secure aggregation: the site reports its token count only inside its masked
    # vector, never in the clear (sent only when true)
    secure: bool = False

    def __post_init__(self) -> None:
        _require(bool(self.run_key), "run_key", "must not be empty")
        _require(self.seq_len >= 2, "seq_len", f"must be >= 2, got {self.seq_len}")
        _require(self.num_sites >= 1, "num_sites", f"must be >= 1, got {self.num_sites}")
        _require(
            self.total_windows >= self.num_sites,
            "total_windows",
            f"{self.total_windows} windows cannot be split over {self.num_sites} sites",
        )
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.dtype in ("float32", "bfloat16", "float16", "float64"), "dtype", f"got {self.dtype}")

    @classmethod
    def from_job(cls, job: JobConfig, run_key: str) -> SiteJob:
        return cls(
            run_key=run_key,
            model=job.model.path,
            dtype=job.model.dtype,
            corpus=job.data.path,
            heldout=tuple(job.data.heldout),
            seq_len=job.data.seq_len,
            total_windows=job.data.calib_windows,
            partitioner=job.federation.partitioner,
            num_sites=job.federation.num_clients,
            seed=job.seed,
            batch_size=job.batch_size,
            ignore=tuple(job.ignore),
            offload=job.model.offload,
            secure=job.privacy.name != "none",
        )

    def to_record(self) -> dict:
        record = {f.name: getattr(self, f.name) for f in fields(self)}
        record = {k: list(v) if isinstance(v, tuple) else v for k, v in record.items()}
        for key in _SENT_WHEN_SET:
            if not record[key]:
                del record[key]  # the default travels as nothing
        return record

    @classmethod
    def from_record(cls, record: Mapping) -> SiteJob:
        types = {"heldout": tuple, "seq_len": int, "total_windows": int, "num_sites": int, "seed": int}
        types.update(batch_size=int, ignore=tuple, offload=bool, secure=bool)
        names = [f.name for f in fields(cls) if f.name not in _SENT_WHEN_SET or f.name in record]
        return cls(**{name: _read(record, name, types.get(name, str)) for name in names})


STRUCTURED = "structured"  # the pattern that removes whole units (``structured_*`` keys travel with it)
_STRUCTURED_KEYS = ("structured_ffn", "structured_heads")  # MethodSpec keys sent only with that pattern
_DEPTH_KEYS = ("structured_blocks", "structured_attention")  # sent only when not zero (pattern structured)
_ALLOCATION_KEYS = {"allocation": str, "owl_m": float, "owl_lambda": float}  # sent only if not uniform


@dataclass(frozen=True)
class MethodSpec:
    """How a site prunes or what it measures: the pruner, its parameters, sparsity, pattern, statistic;
    with ``pattern`` structured also the fractions of FFN neurons and query heads removed per block
    (``structured.ffn``, ``structured.heads``; sent only then, so other records are unchanged) and the
    numbers of whole blocks and attention sublayers removed (``structured.blocks``,
    ``structured.attention``; sent only when not zero): a site of a voting protocol chooses its own."""

    pruner: str
    pruner_params: dict
    sparsity: float
    pattern: str
    stat_kind: str  # "" for a data-free pruner
    structured_ffn: float = 0.0  # pattern=structured only
    structured_heads: float = 0.0  # pattern=structured only
    structured_blocks: int = 0  # pattern=structured only
    structured_attention: int = 0  # pattern=structured only
    allocation: str = (
        "uniform"  # a site that prunes its whole model alone applies this rule (sent if not uniform)
    )
    owl_m: float = 5.0
    owl_lambda: float = 0.08

    def __post_init__(self) -> None:
        _require(0.0 <= self.sparsity < 1.0, "sparsity", f"must be in [0, 1), got {self.sparsity}")
        try:
            self.allocation_spec().rule()
        except (ValueError, KeyError) as error:
            raise MessageError(f"task record: allocation: {error}") from None
        for key in _STRUCTURED_KEYS:
            value = getattr(self, key)
            if self.pattern != STRUCTURED:
                _require(
                    value == 0.0, key, f"only with pattern {STRUCTURED!r}, got {value} with {self.pattern!r}"
                )
            _require(0.0 <= value < 1.0, key, f"must be in [0, 1), got {value}")
        for key in _DEPTH_KEYS:
            value = getattr(self, key)
            _require(value >= 0, key, f"must be >= 0, got {value}")
            _require(not value or self.pattern == STRUCTURED, key, f"only with pattern {STRUCTURED!r}")

    @classmethod
    def from_job(cls, job: JobConfig, pruner) -> MethodSpec:
        structured = str(job.pattern) == STRUCTURED
        return cls(
            pruner=pruner.name,
            pruner_params=dict(job.pruner.params),
            sparsity=float(target_sparsity(job)),
            pattern=str(job.pattern),
            stat_kind=pruner.stat_kind or "",
            structured_ffn=float(job.structured.ffn) if structured else 0.0,
            structured_heads=float(job.structured.heads) if structured else 0.0,
            structured_blocks=int(job.structured.blocks) if structured else 0,
            structured_attention=int(job.structured.attention) if structured else 0,
            allocation=job.allocation.name,
            owl_m=job.allocation.m,
            owl_lambda=job.allocation.lam,
        )

    def allocation_spec(self) -> AllocationSpec:
        return AllocationSpec(self.allocation, self.owl_m, self.owl_lambda)

    def to_record(self) -> dict:
        record = {
            "pruner": self.pruner,
            "pruner_params": json.dumps(self.pruner_params),
            "sparsity": float(self.sparsity),
            "pattern": self.pattern,
            "stat_kind": self.stat_kind,
        }
        if not self.stat_kind:  # a data-free pruner; Flower's records cannot hold an empty string
            del record["stat_kind"]
        if self.pattern == STRUCTURED:
            record.update({key: float(getattr(self, key)) for key in _STRUCTURED_KEYS})
        record.update({key: int(getattr(self, key)) for key in _DEPTH_KEYS if getattr(self, key)})
        if self.allocation != "uniform":
            record.update(
                allocation=self.allocation, owl_m=float(self.owl_m), owl_lambda=float(self.owl_lambda)
            )
        return record

    @classmethod
    def from_record(cls, record: Mapping) -> MethodSpec:
        try:
            params = json.loads(_read(record, "pruner_params", str))
        except json.JSONDecodeError as error:
            raise MessageError(f"task record: key 'pruner_params': not JSON ({error})") from None
        _require(isinstance(params, dict), "pruner_params", "must be a JSON object")
        return cls(
            pruner=_read(record, "pruner", str),
            pruner_params=params,
            sparsity=_read(record, "sparsity", float),
            pattern=_read(record, "pattern", str),
            stat_kind=_read(record, "stat_kind", str) if "stat_kind" in record else "",
            **{  # required with pattern structured (a missing key names itself)
                key: _read(record, key, float)
                for key in _STRUCTURED_KEYS
                if key in record or record.get("pattern") == STRUCTURED
            },
            **{key: _read(record, key, int) for key in _DEPTH_KEYS if key in record},
            **{key: _read(record, key, kind) for key, kind in _ALLOCATION_KEYS.items() if key in record},
        )


def reply_count(metrics: Mapping, key: str, bound: int) -> int:
    """An integer a site reports in its reply metrics (``tokens``, ...): a finite whole number in
    [0, ``bound``], else :class:`MessageError` (the reply is rejected, the run goes on)."""
    if key not in metrics:
        raise MessageError(f"reply metrics: missing {key!r}")
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MessageError(f"reply metrics: {key!r} = {value!r} is not a number")
    if not math.isfinite(value) or value != int(value) or not 0 <= value <= bound:
        raise MessageError(f"reply metrics: {key!r} = {value!r} is not a whole number in [0, {bound}]")
    return int(value)


def reply_tokens(metrics: Mapping, config: Mapping) -> int:
    """A site's calibration token count, at most the job's ``total_windows × seq_len``."""
    job = SiteJob.from_record(config)
    return reply_count(metrics, "tokens", job.total_windows * job.seq_len)


UPDATE_KINDS = tuple(EDITS)  # masks | weights | kept (fedprune.edits)


# a block's statistics (or a site's masks / unit votes of it); the dense model's influence sums, or with a
# voting protocol the site's depth vote from its own (structured depth pruning); every dense block's
# statistics of kind ``stat_kind`` (an allocation rule such as OWL)
TASK_KINDS = ("stats", "influence", "dense")


@dataclass(frozen=True)
class BlockTask:
    """Which block a per-block task is about, how the previous block's edit travels, and (structured
    depth pruning, sent only when set) what the task computes and which blocks / attention sublayers
    are removed, so that a site moves its inputs past removed blocks and computes statistics of a block
    without its attention."""

    block: int
    update_kind: str = "masks"  # the wire kind of the previous block's edit
    task: str = "stats"
    removed_blocks: tuple[int, ...] = ()
    removed_attention: tuple[int, ...] = ()
    stat_kind: str = ""  # task "dense": the statistic of every dense block
    sparsity: float | None = None  # this block's own sparsity (a non-uniform allocation); None: the job's

    def __post_init__(self) -> None:
        _require(self.block >= 0, "block", f"must be >= 0, got {self.block}")
        _require(self.update_kind in UPDATE_KINDS, "update_kind", f"must be one of {UPDATE_KINDS}")
        _require(self.task in TASK_KINDS, "task", f"must be one of {TASK_KINDS}")
        _require(
            (self.task == "dense") == bool(self.stat_kind)
            and (not self.stat_kind or self.stat_kind in STAT_KINDS),
            "stat_kind",
            f"task 'dense' names one of {sorted(STAT_KINDS)}, and only it; got {self.stat_kind!r}",
        )
        for key in ("removed_blocks", "removed_attention"):
            values = getattr(self, key)
            _require(all(v >= 0 for v in values) and len(set(values)) == len(values), key, f"got {values}")
        _require(
            not set(self.removed_blocks) & set(self.removed_attention),
            "removed_attention",
            "names a removed block",
        )
        _require(
            self.sparsity is None or 0.0 <= self.sparsity < 1.0,
            "block_sparsity",
            f"must be in [0, 1), got {self.sparsity}",
        )
        _require(self.block not in self.removed_blocks, "block", f"block {self.block} is removed")

    @property
    def previous(self) -> int:
        """The block whose edit this task carries: the last block before ``block`` that is not removed
        (-1 if none)."""
        return max((b for b in range(self.block) if b not in self.removed_blocks), default=-1)

    def to_record(self) -> dict:
        record = {"block": self.block, "update_kind": self.update_kind}
        if self.task != "stats":
            record["task"] = self.task
        if self.stat_kind:
            record["stat_kind_dense"] = self.stat_kind
        if self.sparsity is not None:
            record["block_sparsity"] = float(self.sparsity)
        for key in ("removed_blocks", "removed_attention"):
            if getattr(self, key):
                record[key] = [int(v) for v in getattr(self, key)]
        return record

    @classmethod
    def from_record(cls, record: Mapping) -> BlockTask:
        def ints(key: str) -> tuple[int, ...]:
            if key not in record:
                return ()
            values = record[key]
            if isinstance(values, str | bytes) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in values
            ):
                raise MessageError(f"task record: key {key!r} = {values!r}: expected a list of integers")
            return tuple(int(v) for v in values)

        return cls(
            block=_read(record, "block", int),
            update_kind=_read(record, "update_kind", str),
            task=_read(record, "task", str) if "task" in record else "stats",
            removed_blocks=ints("removed_blocks"),
            removed_attention=ints("removed_attention"),
            stat_kind=_read(record, "stat_kind_dense", str) if "stat_kind_dense" in record else "",
            sparsity=_read(record, "block_sparsity", float) if "block_sparsity" in record else None,
        )
