"""The prune clocks: CPU time of this process and of its live child processes."""

import subprocess
import sys
import time

import psutil

from fedprune.timing import StepClock, tree_cpu_seconds

BUSY = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\nimport sys; sys.stdin.read()"


def test_tree_cpu_counts_a_live_child():
    child = subprocess.Popen([sys.executable, "-c", BUSY], stdin=subprocess.PIPE)
    try:
        process = psutil.Process(child.pid)
        deadline = time.monotonic() + 30
        while sum(process.cpu_times()[:2]) < 0.6 and time.monotonic() < deadline:
            time.sleep(0.05)  # until the child has burnt its 0.6 s (then it waits on stdin)
        own = time.process_time()
        tree = tree_cpu_seconds()
        assert tree - own >= 0.55  # the child's CPU is in the tree's total, not in this process's own
    finally:
        child.communicate(b"")


def test_step_clock_keeps_its_first_reading():
    clock = StepClock()
    end = time.process_time() + 0.2
    while time.process_time() < end:
        pass
    clock.stop_cpu()
    first = clock.cpu_s
    assert first >= 0.15
    end = time.process_time() + 0.2
    while time.process_time() < end:
        pass
    metrics = clock.metrics()
    assert metrics["prune_cpu_s"] == first  # read while the work ran, not again
    assert metrics["prune_s"] >= 0.35  # the wall clock was read only now


def test_a_child_that_ends_during_the_step_never_makes_it_negative():
    child = subprocess.Popen([sys.executable, "-c", BUSY], stdin=subprocess.PIPE)
    process = psutil.Process(child.pid)
    deadline = time.monotonic() + 30
    while sum(process.cpu_times()[:2]) < 0.6 and time.monotonic() < deadline:
        time.sleep(0.05)
    clock = StepClock()  # the busy child is counted at the start ...
    child.communicate(b"")  # ... and gone at the end
    assert 0 <= clock.stop().cpu_s < 0.5
