#!/usr/bin/env bash
# Centralized pruning of SmolLM2-135M: three pruners × {50% unstructured, 2:4}; calibration 128 × 512
# tokens from the training works; perplexity on held-out works (first 32 round-robin 512-token windows).
# Writes experiments/results/centralized_smollm2.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-multirun/centralized_table}
cmd=".venv/bin/fedprune -m protocol=centralized pruner=magnitude,wanda,sparsegpt pattern=unstructured,2:4 sparsity=0.5 \
data.calib_windows=128 data.seq_len=512 data.eval_windows=32 save_model=false progress=false \
hydra.sweep.dir=$out"
eval "$cmd"
mkdir -p experiments/results
.venv/bin/python experiments/make_table.py "$out" experiments/results/centralized_smollm2 \
  --title "Centralized pruning, SmolLM2-135M, Shakespeare" --command "bash experiments/centralized_table.sh"
