"""Wall and CPU clocks for the prune step (``prune_s``, ``prune_cpu_s`` in metrics.json).

CPU time counts this process and its live descendants: in a Flower simulation the sites run in Ray
worker processes started under this one, so their work is counted as long as the clock is read while
they are alive (at the end of the server routine). In a deployment the sites are other machines: only
the coordinator's CPU is counted there.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import psutil


def tree_cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of process ``pid`` (default: this one) and its live descendants."""
    root = psutil.Process(pid or os.getpid())
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # ended (or hidden) since it was listed
        total += times.user + times.system
    return total


@dataclass
class StepClock:
    """Wall and process-tree CPU seconds since construction, frozen by :meth:`stop`."""

    wall_start: float = field(default_factory=time.perf_counter)
    cpu_start: float = field(default_factory=tree_cpu_seconds)
    wall_s: float | None = None
    cpu_s: float | None = None

    def stop_cpu(self) -> StepClock:
        """Read the CPU clock once (later calls keep the first reading); returns itself."""
        if self.cpu_s is None:
            self.cpu_s = tree_cpu_seconds() - self.cpu_start
        return self

    def stop(self) -> StepClock:
        """Read both clocks once each (a clock already read keeps its reading); returns itself."""
        if self.wall_s is None:
            self.wall_s = time.perf_counter() - self.wall_start
        return self.stop_cpu()

    def metrics(self) -> dict[str, float]:
        """``prune_s`` and ``prune_cpu_s``."""
        self.stop()
        return {"prune_s": self.wall_s, "prune_cpu_s": self.cpu_s}
