"""Wall and CPU clocks for the prune step (``prune_s``, ``prune_cpu_s`` in metrics.json).

CPU time counts this process and its live descendants: in a Flower simulation the sites run in Ray
worker processes started under this one, so their work is counted as long as the clock is read while
they are alive (at the end of the server routine); a process that ends before the reading is left out. In a deployment the sites are other machines: only
the coordinator's CPU is counted there.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import psutil


def tree_cpu_times(pid: int | None = None) -> dict[int, float]:
    """User + system CPU seconds of process ``pid`` (default: this one) and of each live descendant, by
    process id (with its start time, so that a reused id is not taken for the same process)."""
    root = psutil.Process(pid or os.getpid())
    times: dict[tuple[int, float], float] = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            with process.oneshot():
                cpu = process.cpu_times()
                times[(process.pid, process.create_time())] = cpu.user + cpu.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # ended (or hidden) since it was listed
    return times


def tree_cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of process ``pid`` (default: this one) and its live descendants."""
    return sum(tree_cpu_times(pid).values())


def cpu_seconds_since(start: dict, now: dict) -> float:
    """CPU seconds spent between two :func:`tree_cpu_times` readings by the processes alive at the second
    (a process that ended in between is not counted: the total never goes down)."""
    return sum(cpu - start.get(key, 0.0) for key, cpu in now.items())


@dataclass
class StepClock:
    """Wall and process-tree CPU seconds since construction, frozen by :meth:`stop`."""

    wall_start: float = field(default_factory=time.perf_counter)
    cpu_start: dict = field(default_factory=tree_cpu_times)
    wall_s: float | None = None
    cpu_s: float | None = None

    def stop_cpu(self) -> StepClock:
        """Read the CPU clock once (later calls keep the first reading); returns itself."""
        if self.cpu_s is None:
            self.cpu_s = cpu_seconds_since(self.cpu_start, tree_cpu_times())
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
