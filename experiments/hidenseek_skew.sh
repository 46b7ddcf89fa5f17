#!/usr/bin/env bash
# HideNseek under label skew: 3 sites, Dirichlet alpha in {0.1, 1.0}, density 0.5, 20 rounds, 5 local
# epochs; dense FedAvg vs the sign supermask with aggregation vote (1 bit up), score_delta (1 bit + one
# float32 up; the server keeps float scores) and score_average (float32 scores up). Runs one at a time.
# Writes experiments/results/hidenseek_skew.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-multirun/hidenseek_skew}
common="protocol=hidenseek protocol.density=0.5 federation.num_clients=3 federation.min_clients=3 progress=false"
for alpha in 0.1 1.0; do
  for run in "fedavg_dense vote" "sign_supermask vote" "sign_supermask score_delta" "sign_supermask score_average"; do
    set -- $run
    .venv/bin/fedprune $common protocol.alpha=$alpha protocol.variant=$1 protocol.aggregation=$2 \
      "hydra.run.dir=$out/alpha$alpha-$1-$2"
  done
done
mkdir -p experiments/results
.venv/bin/python - "$out" experiments/results/hidenseek_skew "bash experiments/hidenseek_skew.sh" <<'PY'
import json
import sys
from pathlib import Path

root, prefix, command = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
rows = [json.loads(p.read_text()) for p in sorted(root.glob("*/metrics.json"))]
order = {"vote": 0, "score_delta": 1, "score_average": 2}
rows.sort(key=lambda m: (m["alpha"], m["variant"] != "fedavg_dense", order[m["aggregation"]]))
dense = {m["alpha"]: m for m in rows if m["variant"] == "fedavg_dense"}
head = ["alpha", "variant", "aggregation", "acc final", "acc best", "mean acc last 5", "Δ vs dense (final)",
        "up bytes/site/round", "up / dense up", "down bytes/site/round"]
lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
for m in rows:
    ref = dense[m["alpha"]]
    agg = "—" if m["variant"] == "fedavg_dense" else m["aggregation"]
    cells = [m["alpha"], m["variant"], agg, f"{m['final_accuracy']:.3f}", f"{max(m['accuracy']):.3f}",
             f"{sum(m['accuracy'][-5:]) / 5:.3f}",
             f"{100 * (m['final_accuracy'] - ref['final_accuracy']):+.1f} pts",
             f"{m['mean_bytes_up_per_client_round']:.0f}",
             f"1/{ref['mean_bytes_up_per_client_round'] / m['mean_bytes_up_per_client_round']:.1f}",
             f"{m['mean_bytes_down_per_client_round']:.0f}"]
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
first = rows[0]
text = (f"# HideNseek under label skew: {first['num_clients']} sites, {first['rounds']} rounds, "
        f"{first['local_epochs']} local epochs, density 0.5, {first['model']} ({first['total_weights']} weights)\n\n"
        f"Command: `{command}`\n\n" + "\n".join(lines) + "\n")
prefix.with_suffix(".md").write_text(text)
prefix.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
print(text)
PY
