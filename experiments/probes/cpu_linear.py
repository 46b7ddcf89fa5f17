"""Block passes on SmolLM2 with float32 linears through MKL (``FEDPRUNE_LINEAR=torch``) and oneDNN, ABAB.

python experiments/probes/cpu_linear.py [windows] [rounds]

Runs ``fedprune.sequential.run_block`` over every decoder block of the bundled SmolLM2-135M on the same
calibration windows (micro-batch 4, one thread), alternating the two backends round by round in one
process, and prints each round's CPU seconds, the median ratio and the largest difference of the last
block's outputs between the two.
"""

import os
import statistics
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from fedprune.cpu_linear import ENV, onednn_available  # noqa: E402  (after sys.path)
from fedprune.data.assets import ensure_corpus, ensure_model  # noqa: E402  (after sys.path)
from fedprune.data.corpus import load_works, split_works  # noqa: E402  (after sys.path)
from fedprune.data.windows import sample_windows, tokenize_works  # noqa: E402  (after sys.path)
from fedprune.models import find_blocks, load_causal_lm, load_tokenizer  # noqa: E402  (after sys.path)
from fedprune.sequential import capture_block_inputs, run_block  # noqa: E402  (after sys.path)


def all_blocks(blocks, inputs):
    for block in blocks:
        inputs = run_block(block, inputs)
    return torch.cat(inputs.hidden)


def main() -> None:
    windows = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    print("oneDNN available:", onednn_available())
    path = ensure_model("smollm2-135m")
    calib, _ = split_works(load_works(ensure_corpus("shakespeare")))
    ids = sample_windows(tokenize_works(load_tokenizer(path), calib), windows, 512, seed=0)
    model = load_causal_lm(path).eval()
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, ids, 4)
    seconds: dict[str, list[float]] = {"torch": [], "onednn": []}
    outputs = {}
    for _ in range(rounds):
        for backend in ("torch", "onednn"):
            os.environ[ENV] = backend
            start = time.process_time()
            outputs[backend] = all_blocks(blocks, inputs)
            seconds[backend].append(time.process_time() - start)
    for backend, values in seconds.items():
        print(f"{backend:7s} CPU s per pass over {len(blocks)} blocks:", [round(v, 2) for v in values])
    ratio = statistics.median(o / t for o, t in zip(seconds["onednn"], seconds["torch"], strict=True))
    diff = (outputs["onednn"] - outputs["torch"]).abs().max().item()
    scale = outputs["torch"].abs().max().item()
    print(
        f"median oneDNN / MKL: {ratio:.3f}; last outputs differ by at most {diff:.3g} (max |x| {scale:.3g})"
    )


if __name__ == "__main__":
    main()
