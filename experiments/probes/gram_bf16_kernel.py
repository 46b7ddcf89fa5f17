"""The bfloat16 Gram kernel (``fedprune.cpu_gram``) against the float32 upcast it replaces: process CPU
seconds of ``gram_sum`` on one micro-batch of SmolLM2's layer inputs (4 windows x 512 tokens; widths 576
and 1536), the two interleaved so that load on the machine hits them alike, and each one's largest error
against a float64 product, relative to the largest entry.

Usage: python experiments/probes/gram_bf16_kernel.py [THREADS] [REPEATS]
"""

import os
import statistics
import sys
import time

import torch

from fedprune.cpu_gram import ENV, native_gram_available
from fedprune.stat_kinds import gram_sum


def timed(x: torch.Tensor, backend: str) -> tuple[float, torch.Tensor]:
    os.environ[ENV] = backend
    start = time.process_time()
    total = gram_sum(x)
    return time.process_time() - start, total


def main() -> None:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    torch.set_num_threads(threads)
    os.environ.pop(ENV, None)
    if not native_gram_available():
        sys.exit("the bfloat16 Gram kernel is unavailable here (see fedprune.cpu_gram's log)")
    print(f"{threads} thread(s), {repeats} interleaved repeats, process CPU seconds (median)")
    print("| width | kernel s | float32 upcast s | ratio | kernel rel. error | float32 rel. error |")
    print("| --- | --- | --- | --- | --- | --- |")
    for width in (576, 1536):
        generator = torch.Generator().manual_seed(width)
        x = torch.randn(4, 512, width, generator=generator).to(torch.bfloat16)  # (windows, tokens, in)
        reference = sum(w.double().t() @ w.double() for w in x)
        scale = float(reference.abs().max())
        times: dict[str, list[float]] = {"native": [], "torch": []}
        totals = {}
        for _ in range(repeats + 1):  # the first round warms up and is dropped
            for backend in times:
                seconds, totals[backend] = timed(x, backend)
                times[backend].append(seconds)
        native, upcast = (statistics.median(times[b][1:]) for b in ("native", "torch"))
        errors = [float((totals[b] - reference).abs().max()) / scale for b in ("native", "torch")]
        print(
            f"| {width} | {native:.4f} | {upcast:.4f} | {native / upcast:.2f} "
            f"| {errors[0]:.1e} | {errors[1]:.1e} |"
        )
    os.environ.pop(ENV, None)


if __name__ == "__main__":
    main()
