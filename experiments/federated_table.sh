#!/usr/bin/env bash
# Federated pruning of SmolLM2-135M on Flower (simulation): 8 sites, by_document partition, wanda and
# sparsegpt, 50% unstructured and 2:4. Rows: centralized, local (mean over sites), mask_vote ×
# {layer,row,column} × {scaling off,on}, mask_vote_sync, stats_sync. Columns come from each run's
# metrics.json (perplexity, upload bytes per client, wall time).
# Scale with WINDOWS / SEQ_LEN / EVAL (defaults: the paper setting 128 × 512; eval 32 windows).
# Writes experiments/results/federated_smollm2.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-multirun/federated_table}
common="pruner=wanda,sparsegpt pattern=unstructured,2:4 sparsity=0.5 federation.num_clients=8 \
federation.partitioner=by_document data.calib_windows=${WINDOWS:-128} data.seq_len=${SEQ_LEN:-512} \
data.eval_windows=${EVAL:-32} save_model=false progress=false"
run() { .venv/bin/fedprune -m "$@" $common "hydra.sweep.dir=$out/$1"; }
run protocol=centralized
run protocol=local
run protocol=mask_vote protocol.group=layer,row,column protocol.scaling=false,true
run protocol=mask_vote_sync
run protocol=stats_sync
mkdir -p experiments/results
.venv/bin/python experiments/make_table.py "$out" experiments/results/federated_smollm2 \
  --title "Federated pruning, SmolLM2-135M, 8 sites, by_document" \
  --command "WINDOWS=${WINDOWS:-128} SEQ_LEN=${SEQ_LEN:-512} EVAL=${EVAL:-32} bash experiments/federated_table.sh"
