"""Probe: does fedprune's SparseGPT perplexity follow llm-compressor's rounding? fedprune's centralized
SparseGPT on the calibration / held-out windows that ``experiments/bench_vs_llmcompressor.py --keep-work``
left in its work folder, one thread, with only its arithmetic changed towards llm-compressor's:

  asis        fedprune as it is (float64 Gram sums, float64 flip-Cholesky factor)
  f32         llm-compressor's float32 inverse-Hessian factor (Cholesky, cholesky_inverse, upper Cholesky)
  llmc        f32, plus one float32 Gram per micro-batch over all its tokens
  llmc_eager  llmc, plus eager attention during calibration (perplexity always under sdpa)

python experiments/probes/sparsegpt_rounding.py WORK_DIR llmc_eager 2:4    # WORK_DIR holds calib_32x512.pt, eval.pt
Prints the held-out perplexity (fedprune.eval.perplexity, as the benchmark scores both libraries).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import fedprune.pruners.sparsegpt as sparsegpt  # noqa: E402  (after sys.path)
import fedprune.stat_kinds as stat_kinds  # noqa: E402
from fedprune.data.assets import ensure_model  # noqa: E402
from fedprune.eval import perplexity  # noqa: E402
from fedprune.masks import parse_pattern  # noqa: E402
from fedprune.models import load_causal_lm  # noqa: E402
from fedprune.pruners import get_pruner  # noqa: E402
from fedprune.sequential import prune_model_  # noqa: E402

MODES = ("asis", "f32", "llmc", "llmc_eager")


def float32_factor(hessian: torch.Tensor) -> torch.Tensor:
    """llm-compressor's route to the upper Cholesky factor of H⁻¹, in float32."""
    h = hessian.float()
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).double()


def float32_gram(_kind, x: torch.Tensor) -> torch.Tensor:
    """One float32 product over every token of the micro-batch (not per window)."""
    x = x.detach().float().reshape(-1, x.shape[-1])  # (tokens, in)
    return (x.t() @ x).double()


def main() -> None:
    work, mode, pattern = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    if mode not in MODES:
        raise SystemExit(f"mode must be one of {MODES}, got {mode!r}")
    torch.set_num_threads(1)
    if mode != "asis":
        sparsegpt.inverse_hessian_factor = float32_factor
    if mode.startswith("llmc"):
        stat_kinds.HessianKind.compute = float32_gram
    calib, held_out = torch.load(work / "calib_32x512.pt"), torch.load(work / "eval.pt")
    model = load_causal_lm(ensure_model("smollm2-135m"))
    if mode == "llmc_eager":
        model.set_attn_implementation("eager")
    pruner = get_pruner("sparsegpt", percdamp=0.01, blocksize=128)
    prune_model_(model, calib, pruner, 0.5, parse_pattern(pattern), 4, False)
    model.set_attn_implementation("sdpa")
    print(mode, pattern, "ppl", perplexity(model, held_out, 4).value, flush=True)


if __name__ == "__main__":
    main()
