"""Probe: on SmolLM2's real activations, do bfloat16 block passes drift further from float64 with attention
by query chunks (fedprune.cpu_attention) than with transformers' sdpa?

python experiments/probes/bf16_attention_drift.py [windows]    # default 4 calibration windows, one thread

Runs the dense model's 30 decoder blocks with ``fedprune.sequential.run_block`` (each path on its own
hidden states, from the same block-0 inputs) in float64 (the reference, sdpa) and in float32 and bfloat16
under each attention setting, and prints each path's relative RMS error against float64 after blocks 1, 10,
20 and 30 (``‖x − x64‖ / ‖x64‖`` over all tokens).
"""

import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from calibration import smollm2_with_windows  # noqa: E402  (experiments/probes/calibration.py)

from fedprune import cpu_attention  # noqa: E402  (after sys.path)
from fedprune.models import find_blocks  # noqa: E402
from fedprune.sequential import capture_block_inputs, run_block  # noqa: E402

REPORT_AFTER = (1, 10, 20, 30)


def block_outputs(model: torch.nn.Module, ids: torch.Tensor, attention: str) -> dict[int, torch.Tensor]:
    """Hidden states after the blocks in REPORT_AFTER, float64, ``(windows, tokens, hidden)``."""
    os.environ[cpu_attention.ENV] = attention
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, ids, 4)
    kept = {}
    for index, block in enumerate(blocks, start=1):
        inputs = run_block(block, inputs)
        if index in REPORT_AFTER:
            kept[index] = torch.cat(inputs.hidden).double()
    return kept


def main() -> None:
    windows = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    model, ids = smollm2_with_windows(windows, 512)
    model.eval()
    reference = block_outputs(model.double(), ids, "torch")
    for dtype in (torch.float32, torch.bfloat16):
        for attention in ("torch", "chunked"):
            got = block_outputs(model.to(dtype), ids, attention)
            errors = ", ".join(
                f"block {i}: {((got[i] - reference[i]).norm() / reference[i].norm()).item():.4e}"
                for i in REPORT_AFTER
            )
            print(
                f"{str(dtype):15s} attention={attention:8s} rel. RMS error vs float64 after {errors}",
                flush=True,
            )


if __name__ == "__main__":
    main()
