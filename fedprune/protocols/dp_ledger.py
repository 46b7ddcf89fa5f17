"""A site's ledger of the privacy budget it has spent on its data (zCDP ``rho``, composing by addition).

One JSON file, ``{"version": 1, "data": {<fingerprint>: {"rho": total, "releases": count}}}``, kept where
it survives runs (node config ``dp-ledger``, default ``<cache>/dp_ledger/<site key>.json``), written
atomically (temporary file, then ``os.replace``) under an exclusive lock, so concurrent runs of the
same site add up. :meth:`DPLedger.charge` records a release before its noised vector leaves the site
and refuses one that would take the data's total past the budget (:class:`BudgetError`, naming it).

A fingerprint names the data the budget protects: :func:`data_fingerprint` hashes the names and
contents of every ``.txt`` work in the folder a site draws its windows from (its ``data-path``, or the
bundled corpus in simulation), so other runs, seeds or window draws from the same works share one
total.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger(__name__)

VERSION = 1


class BudgetError(RuntimeError):
    """A release would spend more than the site's budget on its data; nothing was sent."""


@dataclass(frozen=True)
class Spent:
    """What one fingerprint has spent: total ``rho`` and the number of releases."""

    rho: float = 0.0
    releases: int = 0


def _folder_state(folder: Path) -> tuple[tuple[str, int, int], ...]:
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.glob("*.txt")))


@lru_cache(maxsize=8)
def _fingerprint(folder: str, state: tuple) -> str:
    digest = hashlib.sha256()
    for name, _, _ in state:
        digest.update(name.encode() + b"\0")
        digest.update(hashlib.sha256((Path(folder) / name).read_bytes()).digest())
    return digest.hexdigest()


def data_fingerprint(folder: str | Path) -> str:
    """sha256 over the sorted names and contents of the folder's ``.txt`` works (cached per version)."""
    folder = Path(folder)
    state = _folder_state(folder)
    if not state:
        raise ValueError(f"no .txt works in {folder} to fingerprint")
    return _fingerprint(str(folder.resolve()), state)


class DPLedger:
    """The ledger file at ``path`` (created on the first release)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def spent(self, fingerprint: str) -> Spent:
        """What has been spent on ``fingerprint`` so far."""
        entry = self._read().get(fingerprint)
        return Spent() if entry is None else Spent(float(entry["rho"]), int(entry["releases"]))

    def charge(self, fingerprint: str, rho: float, budget: float | None) -> Spent:
        """Record one release of ``rho`` on ``fingerprint`` (persisted before returning); the new total.

        Raises :class:`BudgetError` (recording nothing) when the total would exceed ``budget``
        (None: no limit)."""
        if not (math.isfinite(rho) and rho >= 0):
            raise ValueError(f"rho must be finite and >= 0, got {rho}")
        with self._locked():
            entries = self._read()
            old = entries.get(fingerprint, {"rho": 0.0, "releases": 0})
            total = float(old["rho"]) + rho
            if budget is not None and total > budget * (1 + 1e-12):
                raise BudgetError(
                    f"dp budget: this release (rho {rho:.6g}) would bring the data's total to {total:.6g}, "
                    f"above the site's budget rho {budget:.6g} (node config dp-budget-rho, else dp-max-epsilon "
                    f"with dp-delta; spent {float(old['rho']):.6g} in {int(old['releases'])} releases, "
                    f"ledger {self.path})"
                )
            entries[fingerprint] = {"rho": total, "releases": int(old["releases"]) + 1}
            self._write(entries)
        logger.info("dp ledger %s: +rho %.6g -> %.6g on %s", self.path, rho, total, fingerprint[:12])
        return Spent(total, int(old["releases"]) + 1)

    def _read(self) -> dict:
        if not self.path.exists():
            return {}
        data = json.loads(self.path.read_text())
        if data.get("version") != VERSION:
            raise ValueError(f"dp ledger {self.path}: unknown version {data.get('version')!r}")
        return dict(data["data"])

    def _write(self, entries: dict) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump({"version": VERSION, "data": entries}, handle, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
