#!/usr/bin/env bash
# Federated pruning of SmolLM2-135M on Flower (simulation): 8 sites, by_document partition, wanda and
# sparsegpt, 50% unstructured and 2:4. Rows: centralized, local (mean over sites), mask_vote ×
# {layer,row,column} × {scaling off,on}, mask_vote_sync, stats_sync. Columns come from each run's
# metrics.json (perplexity, upload bytes per client, wall time). Every row is a real run of `fedprune`,
# except 5 of the 6 mask_vote rows: those re-aggregate the vote counts of the real (layer, no scaling)
# run with the other server-side choices (python -m cli.revote; same uploads, same traffic and time).
# For each pruner and pattern, centralized and stats_sync run back to back (the wall-time benchmark
# experiments/federation_bench.py compares them).
# Scale with WINDOWS / SEQ_LEN / EVAL (defaults: the paper setting 128 × 512; eval 32 windows);
# PRUNERS / PATTERNS restrict the grid. Writes experiments/results/federated_smollm2.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-multirun/federated_table}
windows=${WINDOWS:-128}; seq_len=${SEQ_LEN:-512}; eval=${EVAL:-32}
common="sparsity=0.5 federation.num_clients=8 federation.partitioner=by_document \
data.calib_windows=$windows data.seq_len=$seq_len data.eval_windows=$eval save_model=false progress=false"
run() {  # run <dir> <overrides...>: one fedprune run, skipped if its metrics.json exists (resumable)
  local dir="$out/$1"; shift
  if [[ -f "$dir/metrics.json" ]]; then return; fi
  .venv/bin/fedprune "$@" $common "hydra.run.dir=$dir"
}
for pattern in ${PATTERNS:-unstructured 2:4}; do
  for pruner in ${PRUNERS:-wanda sparsegpt}; do
    tag="${pruner}_${pattern/:/-}"
    run "$tag/centralized" protocol=centralized pruner=$pruner pattern=$pattern
    run "$tag/stats_sync" protocol=stats_sync pruner=$pruner pattern=$pattern
    run "$tag/mask_vote_sync" protocol=mask_vote_sync pruner=$pruner pattern=$pattern
    run "$tag/local" protocol=local pruner=$pruner pattern=$pattern
    # one real one-shot run; its vote counts re-aggregated for the other 5 group/scaling choices (the
    # sites' uploads do not depend on them: python -m cli.revote gives the model such a run would)
    run "$tag/mask_vote_layer_false" protocol=mask_vote protocol.save_votes=true pruner=$pruner pattern=$pattern
    for group in layer row column; do
      for scaling in false true; do
        dir="$out/$tag/mask_vote_${group}_$scaling"
        [[ -f "$dir/metrics.json" ]] || .venv/bin/python -m cli.revote "$out/$tag/mask_vote_layer_false" "$dir" \
          --group $group --scaling $scaling
      done
    done
  done
done
cmd="WINDOWS=$windows SEQ_LEN=$seq_len EVAL=$eval bash experiments/federated_table.sh"
.venv/bin/python experiments/federated_report.py "$out" experiments/results/federated_smollm2 --command "$cmd"
