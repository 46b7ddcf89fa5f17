#!/usr/bin/env bash
# HideNseek vs its three baselines on digits over Flower (simulation): 3 sites, Dirichlet(alpha) label
# skew, alpha in {0.1, 1.0}; sign supermask (HideNseek), binary supermask and FedAvg of the SynFlow-pruned
# subnetwork at densities 0.5, 0.2, 0.1; dense FedAvg. Columns come from each run's metrics.json: final
# and best test accuracy, upload bytes per site per round and their ratio to dense FedAvg's.
# Scale with ROUNDS (default 20), CLIENTS (default 3), EPOCHS (default 5). The supermask variants use
# protocol.aggregation=vote (the paper's 1-bit majority vote); the sign supermask also runs with the default
# aggregation=score_delta (1 bit per kept weight + the top 2.5% of score changes exactly, see docs/hidenseek.md).
# Resumable: a sweep whose folder already holds all its runs' metrics.json is not run again.
# Writes experiments/results/hidenseek_digits.{md,json,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-multirun/hidenseek_table}
rounds=${ROUNDS:-20}
clients=${CLIENTS:-3}
epochs=${EPOCHS:-5}
base="protocol=hidenseek protocol.alpha=0.1,1.0 protocol.rounds=$rounds protocol.local_epochs=$epochs \
federation.num_clients=$clients federation.min_clients=$clients progress=false"
common="$base protocol.aggregation=vote"
sweep() {  # sweep DIR RUNS OVERRIDES...: one Hydra multirun into DIR unless its RUNS runs are there
  local dir=$1 runs=$2
  shift 2
  if [[ $(find "$dir" -name metrics.json 2>/dev/null | wc -l) -lt $runs ]]; then
    .venv/bin/fedprune -m "$@" "hydra.sweep.dir=$dir"
  fi
}
sweep "$out/pruned" 18 $common protocol.variant=sign_supermask,binary_supermask,fedavg_pruned protocol.density=0.5,0.2,0.1
sweep "$out/dense" 2 $common protocol.variant=fedavg_dense
sweep "$out/score_delta" 6 $base protocol.aggregation=score_delta protocol.variant=sign_supermask protocol.density=0.5,0.2,0.1
mkdir -p experiments/results
.venv/bin/python - "$out" experiments/results/hidenseek_digits \
  "ROUNDS=$rounds CLIENTS=$clients EPOCHS=$epochs bash experiments/hidenseek_table.sh" <<'PY'
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402

root, prefix, command = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
order = {"sign_supermask": 0, "binary_supermask": 1, "fedavg_pruned": 2, "fedavg_dense": 3}
rows = [json.loads(p.read_text()) for p in sorted(root.rglob("metrics.json"))]
rows.sort(key=lambda m: (m["alpha"], -m["density"], order[m["variant"]], m["aggregation"] != "score_delta"))


def label(m):
    """The variant, with its aggregation for the sign supermask (vote or score_delta)."""
    return f"{m['variant']} ({m['aggregation']})" if m["variant"] == "sign_supermask" else m["variant"]


dense = {m["alpha"]: m for m in rows if m["variant"] == "fedavg_dense"}
head = ["alpha", "density", "variant", "prune", "acc round 0", "acc final", "acc best", "Δ vs dense (final)",
        "up bytes/site/round", "up / dense up", "down bytes/site/round", "wall s"]
lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
for m in rows:
    ref = dense[m["alpha"]]
    cells = [m["alpha"], m["density"], label(m), m["prune"], f"{m['accuracy'][0]:.3f}",
             f"{m['final_accuracy']:.3f}", f"{max(m['accuracy']):.3f}",
             f"{100 * (m['final_accuracy'] - ref['final_accuracy']):+.1f} pts",
             f"{m['mean_bytes_up_per_client_round']:.0f}",
             f"1/{ref['mean_bytes_up_per_client_round'] / m['mean_bytes_up_per_client_round']:.1f}",
             f"{m['mean_bytes_down_per_client_round']:.0f}", f"{m['wall_s']:.0f}"]
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
first = rows[0]
text = (f"# HideNseek on digits: {first['num_clients']} sites, {first['rounds']} rounds, "
        f"{first['local_epochs']} local epochs, {first['model']} ({first['total_weights']} weights)\n\n"
        f"Command: `{command}`\n\n" + "\n".join(lines) + "\n")
prefix.with_suffix(".md").write_text(text)
prefix.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
fig, axes = plt.subplots(2, 2, figsize=(10, 7))
for row, alpha in enumerate(sorted(dense)):
    for m in rows:
        if m["alpha"] != alpha or m["density"] not in (0.5, 1.0):
            continue
        up = [0.0]
        for per_site in m["bytes_up_per_client_per_round"]:
            up.append(up[-1] + sum(per_site.values()) / len(per_site))
        axes[row, 0].plot(range(len(m["accuracy"])), m["accuracy"], label=label(m))
        axes[row, 1].plot(up, m["accuracy"], label=label(m))
    axes[row, 0].set(xlabel="round", ylabel=f"test accuracy (alpha {alpha})", ylim=(0, 1))
    axes[row, 1].set(xlabel="cumulative upload bytes per site", xscale="symlog", ylim=(0, 1))
    axes[row, 0].legend(fontsize=8)
fig.suptitle("density 0.5 (dense FedAvg: all weights)")
fig.tight_layout()
fig.savefig(prefix.with_suffix(".png"), dpi=100)
print(text)
PY
