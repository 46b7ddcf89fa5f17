"""The protocol registry: one :class:`ProtocolUnit` per protocol (the Hydra ``protocol`` group maps onto
it), and the checks that run before any work."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from fedprune.config import ConfigError, JobConfig, check, check_offload, check_privacy, check_resume
from fedprune.protocols.federation import Launcher

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProtocolUnit:
    """Everything about one protocol: its typed options, its job, where privacy applies, its summary.

    ``run(job, out_dir, launch)`` runs the whole job and returns its metrics; a federated protocol's
    server routine runs inside ``launch`` (a Flower simulation or deployment, or in process), the others
    ignore it. ``check(job)`` raises :class:`ConfigError` before any work.
    """

    name: str
    options: type  # a dataclass with ``from_options(mapping)``
    run: Callable[[JobConfig, Path, Launcher | None], dict]
    check: Callable[[JobConfig], None]
    summary: Callable[[dict], str]
    federated: bool = False
    secure: bool = False  # the server sums site payloads: secure aggregation applies
    dp: bool = False  # the Gaussian mechanism on summed statistics applies
    offload: bool = False  # works with model.offload=true (decoder blocks loaded one at a time)
    structured: bool = False  # works with pattern=structured (whole units removed)
    depth: bool = False  # and with structured.blocks / structured.attention (whole blocks, sublayers)
    allocation: bool = False  # works with a non-uniform allocation (allocation=owl)
    resumable: bool = False  # writes per-block checkpoints; resume=true continues a killed run


PROTOCOLS: dict[str, ProtocolUnit] = {}


def register_protocol(unit: ProtocolUnit) -> ProtocolUnit:
    if unit.name in PROTOCOLS:
        raise ValueError(f"protocol {unit.name!r} registered twice")
    PROTOCOLS[unit.name] = unit
    return unit


def get_protocol(name: str) -> ProtocolUnit:
    """The registered protocol, or ConfigError naming ``protocol.name``."""
    check(name in PROTOCOLS, "protocol.name", f"unknown protocol {name!r}; known: {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


def parse_options(cls: type, options: Mapping):
    """A protocol's typed options from ``protocol.<key>`` values; unknown keys are an error."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    check(not unknown, f"protocol.{unknown[0] if unknown else ''}", f"unknown option; known: {sorted(known)}")
    defaults, values = cls(), {}  # every option has a default
    for f in fields(cls):
        if f.name not in options:
            continue
        value, kind = options[f.name], type(getattr(defaults, f.name))
        if kind is bool and not isinstance(value, bool):
            raise ConfigError(f"config key 'protocol.{f.name}': must be true or false, got {value!r}")
        try:
            values[f.name] = value if kind is bool else kind(value)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"config key 'protocol.{f.name}': {error}") from None
    return cls(**values)


def validate(job: JobConfig) -> ProtocolUnit:
    """Every check that can run before the model loads; the protocol unit."""
    unit = get_protocol(job.protocol_name)
    unit.options.from_options(job.protocol)
    secure = tuple(name for name, u in PROTOCOLS.items() if u.secure)
    dp = tuple(name for name, u in PROTOCOLS.items() if u.dp)
    check_privacy(job, unit.secure, unit.dp, secure, dp)
    check_offload(job, unit.offload, tuple(name for name, u in PROTOCOLS.items() if u.offload))
    check_resume(job, unit.resumable, tuple(name for name, u in PROTOCOLS.items() if u.resumable))
    check(
        job.pattern != "structured" or unit.structured,
        "pattern",
        f"structured pruning works with protocol {' or '.join(n for n, u in PROTOCOLS.items() if u.structured)}, "
        f"not yet with {job.protocol_name!r}",
    )
    if job.pattern == "structured" and not unit.depth:
        for key, value in (
            ("structured.blocks", job.structured.blocks),
            ("structured.attention", job.structured.attention),
        ):
            check(
                not value,
                key,
                f"removing whole blocks or attention sublayers works with protocol "
                f"{' or '.join(n for n, u in PROTOCOLS.items() if u.depth)}, not {job.protocol_name!r}",
            )
    check(
        job.allocation.name == "uniform" or unit.allocation,
        "allocation",
        f"{job.allocation.name!r} works with protocol "
        f"{' or '.join(n for n, u in PROTOCOLS.items() if u.allocation)}, not yet with {job.protocol_name!r}",
    )
    unit.check(job)
    return unit
