#!/usr/bin/env bash
# HideNseek at density 0.5 over 3 seeds (partition, initialisation, training): dense FedAvg vs the sign
# supermask with aggregation vote and score_delta, 3 sites, Dirichlet alpha in {0.1, 1.0}, 20 rounds,
# 5 local epochs. Resumable (finished runs are kept). Writes experiments/results/hidenseek_seeds.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-multirun/hidenseek_seeds}
common="protocol=hidenseek protocol.density=0.5 federation.num_clients=3 federation.min_clients=3 progress=false"
for alpha in 0.1 1.0; do
  for seed in 0 1 2; do
    for run in "fedavg_dense vote" "sign_supermask score_delta" "sign_supermask vote"; do
      set -- $run
      dir="$out/alpha$alpha-seed$seed-$1-$2"
      [[ -f "$dir/metrics.json" ]] || .venv/bin/fedprune $common protocol.alpha=$alpha seed=$seed \
        protocol.variant=$1 protocol.aggregation=$2 "hydra.run.dir=$dir"
    done
  done
done
mkdir -p experiments/results
.venv/bin/python - "$out" experiments/results/hidenseek_seeds "bash experiments/hidenseek_seeds.sh" <<'PY'
import json
import statistics
import sys
from pathlib import Path

root, prefix, command = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
runs = [json.loads(p.read_text()) for p in sorted(root.glob("*/metrics.json"))]
label = {"fedavg_dense": "dense FedAvg"}
cells, up = {}, {}
for m in runs:
    name = label.get(m["variant"], f"sign supermask, {m['aggregation']}")
    cells.setdefault((m["alpha"], name), {})[m["seed"]] = m["final_accuracy"]
    up.setdefault((m["alpha"], name), []).append(m["mean_bytes_up_per_client_round"])
seeds = sorted({m["seed"] for m in runs})
head = ["alpha", "method", *[f"seed {s}" for s in seeds], "mean", "mean Δ vs dense", "up B/site/round", "up / dense up"]
lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
for (alpha, name), by_seed in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1] != "dense FedAvg", kv[0][1])):
    mean = statistics.mean(by_seed.values())
    dense = statistics.mean(cells[(alpha, "dense FedAvg")].values())
    sent, dense_sent = statistics.mean(up[(alpha, name)]), statistics.mean(up[(alpha, "dense FedAvg")])
    lines.append("| " + " | ".join([str(alpha), name, *[f"{by_seed.get(s, float('nan')):.3f}" for s in seeds],
                                      f"{mean:.3f}", f"{100 * (mean - dense):+.1f} pts", f"{sent:,.0f}",
                                      f"1/{dense_sent / sent:.1f}"]) + " |")
text = (f"# HideNseek over seeds: final test accuracy, 3 sites, density 0.5, 20 rounds, 5 local epochs\n\n"
        f"Command: `{command}`\n\n" + "\n".join(lines) + "\n")
prefix.with_suffix(".md").write_text(text)
prefix.with_suffix(".json").write_text(json.dumps(runs, indent=2) + "\n")
print(text)
PY
