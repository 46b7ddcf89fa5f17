#!/usr/bin/env bash
# Benchmark of issue 3: stats_sync with 8 simulated sites (Flower Simulation Engine, 1 CPU per site)
# against centralized pruning on the same pooled windows, back to back in one script: pruning wall time
# ratio (target <= 1.5) and perplexity difference (target <= 0.1% relative).
# Scale with WINDOWS / SEQ_LEN / EVAL / PRUNER (defaults: 128 × 512 calibration, 8 eval windows, wanda).
# Writes experiments/results/federation_bench.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-multirun/federation_bench}
windows=${WINDOWS:-128}; seq_len=${SEQ_LEN:-512}; eval=${EVAL:-8}; pruner=${PRUNER:-wanda}
common="pruner=$pruner sparsity=0.5 federation.num_clients=8 federation.partitioner=by_document \
data.calib_windows=$windows data.seq_len=$seq_len data.eval_windows=$eval save_model=false progress=false"
for protocol in centralized stats_sync; do
  dir="$out/${pruner}_$protocol"
  [[ -f "$dir/metrics.json" ]] || .venv/bin/fedprune protocol=$protocol $common "hydra.run.dir=$dir"
done
cmd="WINDOWS=$windows SEQ_LEN=$seq_len EVAL=$eval PRUNER=$pruner bash experiments/federation_bench.sh"
.venv/bin/python experiments/federated_report.py "$out" experiments/results/federation_bench --command "$cmd"
