"""The federated results table and the federation benchmark, from the runs of federated_table.sh.

Reads every ``metrics.json`` under RUN_DIR and writes OUT_PREFIX.md / .json with
1. the table the issue asks for: one row per protocol variant; per pattern, wanda and sparsegpt
   perplexity, upload bytes per site and wall time;
2. the benchmark: ``stats_sync`` (8 simulated sites) against ``centralized`` on the same pooled data,
   run back to back by the same script: pruning wall time ratio (target <= 1.5) and perplexity
   difference (target <= 0.1% relative); ``mask_vote`` upload bits per prunable weight (target <= 1 plus
   a small header);
3. every run's metrics in long form.

Usage: python experiments/federated_report.py RUN_DIR OUT_PREFIX [--command "..."]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from make_table import load_metrics, markdown

PRUNERS = ("wanda", "sparsegpt")


def variant(m: dict) -> str:
    """The row label of a run: its protocol, with group and scaling for mask_vote."""
    if m["protocol"] == "mask_vote":
        return f"mask_vote {m['group']}{' +scaling' if m['scaling'] else ''}"
    return "local (mean of sites)" if m["protocol"] == "local" else m["protocol"]


def index(rows: list[dict]) -> dict[tuple[str, str, str], dict]:
    """``(pattern, variant, pruner) -> metrics``."""
    return {(m["pattern"], variant(m), m["pruner"]): m for m in rows}


def pivot(rows: list[dict]) -> str:
    """Rows: protocol variants; per pattern: perplexity, upload bytes and wall time per pruner."""
    table = index(rows)
    patterns = sorted({m["pattern"] for m in rows}, key=lambda p: p != "unstructured")
    variants = list(dict.fromkeys(variant(m) for m in sorted(rows, key=_order)))
    lines = []
    for pattern in patterns:
        dense = [table[k]["ppl_dense"] for k in table if k[0] == pattern]
        lines += [f"### {pattern} (dense perplexity {dense[0]:.2f})", ""]
        head = ["protocol"]
        for p in PRUNERS:
            head += [f"{p} ppl", f"{p} up MB/site", f"{p} wall s"]
        lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for v in variants:
            cells = [v]
            for p in PRUNERS:
                m = table.get((pattern, v, p))
                cells += ["", "", ""] if m is None else [
                    f"{m['ppl_pruned']:.2f}", f"{m.get('bytes_up_per_client', 0) / 1e6:.2f}", f"{m['wall_s']:.0f}"
                ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _order(m: dict) -> tuple:
    rank = ["centralized", "local", "mask_vote", "mask_vote_sync", "stats_sync"]
    return (rank.index(m["protocol"]) if m["protocol"] in rank else 99, str(m.get("group")), bool(m.get("scaling")))


def prunable_weights(model_name: str) -> int:
    """Number of prunable weights (decoder blocks' linear layers) of a bundled model."""
    from fedprune.data.assets import resolve_model_path
    from fedprune.models import find_blocks, find_prunable_layers, get_weight, load_causal_lm

    model = load_causal_lm(resolve_model_path(model_name))
    return sum(
        get_weight(layer).numel() for block in find_blocks(model)[1] for layer in find_prunable_layers(block).values()
    )


def bench(rows: list[dict]) -> tuple[str, list[dict]]:
    """stats_sync vs centralized (time, perplexity) and mask_vote upload bits per prunable weight."""
    table = index(rows)
    lines = [
        "| pattern | pruner | centralized prune s | stats_sync prune s | ratio (<= 1.3) "
        "| centralized prune CPU s | stats_sync prune CPU s | CPU ratio "
        "| ppl centralized | ppl stats_sync | rel. diff (<= 0.1%) |",
        "|" + " --- |" * 11,
    ]
    found = []
    for (pattern, v, pruner), central in sorted(table.items()):
        sync = table.get((pattern, "stats_sync", pruner))
        if v != "centralized" or sync is None:
            continue
        ratio = sync["prune_s"] / central["prune_s"]
        cpu = (central.get("prune_cpu_s"), sync.get("prune_cpu_s"))  # absent in runs before prune_cpu_s
        cpu_ratio = cpu[1] / cpu[0] if None not in cpu else None
        diff = abs(sync["ppl_pruned"] - central["ppl_pruned"]) / central["ppl_pruned"]
        found.append(
            {"pattern": pattern, "pruner": pruner, "time_ratio": ratio, "cpu_ratio": cpu_ratio, "ppl_rel_diff": diff}
        )
        cpu_cells = " | ".join("" if c is None else f"{c:.0f}" for c in cpu)
        lines.append(
            f"| {pattern} | {pruner} | {central['prune_s']:.0f} | {sync['prune_s']:.0f} | {ratio:.2f} "
            f"| {cpu_cells} | {'' if cpu_ratio is None else f'{cpu_ratio:.2f}'} "
            f"| {central['ppl_pruned']:.3f} | {sync['ppl_pruned']:.3f} | {100 * diff:.4f}% |"
        )
    votes = [m for m in rows if m["protocol"] == "mask_vote"]
    if votes:
        weights = prunable_weights(votes[0]["model"])
        upload = max(m["bytes_up_per_client"] for m in votes)
        header = upload - weights / 8
        lines += ["", f"mask_vote upload: at most {upload:.0f} bytes per site = 1 bit for each of the {weights} "
                  f"prunable weights + {header:.0f} bytes of header ({8 * upload / weights:.4f} bits per weight)."]
        found.append({"mask_vote_bytes_up": upload, "prunable_weights": weights, "header_bytes": header})
    return "\n".join(lines), found


def _commit() -> str:
    import subprocess

    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    return result.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_prefix", type=Path)
    parser.add_argument("--command", default="")
    args = parser.parse_args()
    rows = load_metrics(args.run_dir)
    bench_text, bench_rows = bench(rows)
    text = "\n".join(
        [
            "# Federated pruning, SmolLM2-135M, 8 sites, by_document, 50%",
            "",
            "Made by (every row is one real `fedprune` run on the Flower Simulation Engine, 1 CPU per site):",
            "",
            f"```bash\n{args.command}\n```",
            "",
            f"Commit: {_commit()} (the commit that wrote this table).",
            "",
            pivot(rows),
            "## Benchmark: stats_sync (8 sites) vs centralized on the same pooled windows",
            "",
            bench_text,
            "",
            "## Every run",
            "",
            markdown(rows),
            "",
        ]
    )
    args.out_prefix.parent.mkdir(parents=True, exist_ok=True)
    args.out_prefix.with_suffix(".md").write_text(text)
    args.out_prefix.with_suffix(".json").write_text(json.dumps({"runs": rows, "bench": bench_rows}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
