"""Average a benchmark's perplexity comparison over calibration seeds.

On SmolLM2-135M, 2:4 perplexity moves by a few percent under rounding-level changes (another linear
kernel, attention summed in chunks, float32 instead of float64 sums), in either direction, so one
calibration draw cannot place two methods within 1% of each other. Running the same row on other
calibration windows (``--seed`` of ``bench_vs_llmcompressor.py`` and ``bench_dtype.py``) and averaging
tells a systematic gap from that scatter.

Reads the JSON files both benchmarks write (``rows`` with ``pruner``, ``pattern``, ``ppl_rel_diff``);
prints, per comparison, pruner and pattern, each seed's relative perplexity difference, their mean, the mean of the
two perplexities' ratio and the spread (sample standard deviation and the standard error of the mean).

Usage: python experiments/seed_summary.py RESULT.json [RESULT.json ...] [--out SUMMARY.md]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def seed_of(result: dict, row: dict) -> int:
    """The calibration seed of a row: its own, the file's, or ``--seed`` in the file's command (else 0)."""
    for source in (row, result):
        if "seed" in source:
            return int(source["seed"])
    found = re.search(r"--seed[ =](\d+)", result.get("command", ""))
    return int(found.group(1)) if found else 0


def perplexities(row: dict) -> tuple[str, float, float]:
    """What a row of either benchmark compares, and its (reference, compared) perplexities."""
    if "llmcompressor" in row:
        return "fedprune vs llm-compressor", row["llmcompressor"]["ppl"], row["fedprune"]["ppl"]
    return "bfloat16 vs float32", row["ppl_float32"], row["ppl_bfloat16"]


def collect(paths: list[Path]) -> dict[tuple[str, str, str], list[dict]]:
    """Rows by (comparison, pruner, pattern), each with its seed, file and perplexities; a seed twice is an error."""
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for path in paths:
        result = json.loads(path.read_text())
        for row in result["rows"]:
            comparison, reference, compared = perplexities(row)
            entry = {
                "seed": seed_of(result, row),
                "file": path.name,
                "commit": result.get("commit", "?"),
                "reference": reference,
                "compared": compared,
                "rel_diff": row["ppl_rel_diff"],
            }
            key = (comparison, row["pruner"], row["pattern"])
            if any(other["seed"] == entry["seed"] for other in groups[key]):
                raise SystemExit(f"{path}: seed {entry['seed']} of {key} is already in another file")
            groups[key].append(entry)
    return groups


def summarise(entries: list[dict]) -> dict:
    """Mean relative difference over seeds, the ratio of mean perplexities, and the spread."""
    diffs = [e["rel_diff"] for e in entries]
    mean = statistics.fmean(diffs)
    sd = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
    return {
        "seeds": [e["seed"] for e in entries],
        "mean_rel_diff": mean,
        "sd_rel_diff": sd,
        "sem_rel_diff": sd / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan,
        "ratio_of_means": statistics.fmean(e["compared"] for e in entries)
        / statistics.fmean(e["reference"] for e in entries)
        - 1.0,
    }


def table(summaries: list[dict]) -> str:
    """The summaries as a markdown table, one row per comparison, pruner and pattern."""
    lines = [
        "| comparison | pruner | pattern | seed: ppl reference -> compared (rel. diff) | mean rel. diff | sd | s.e.m. "
        "| mean ppl ratio |",
        "|" + " --- |" * 8,
    ]
    for s in summaries:
        per_seed = "; ".join(
            f"{e['seed']}: {e['reference']:.3f} -> {e['compared']:.3f} ({e['rel_diff']:+.2%})"
            for e in s["rows"]
        )
        lines.append(
            f"| {s['comparison']} | {s['pruner']} | {s['pattern']} | {per_seed} | {s['mean_rel_diff']:+.2%} "
            f"| {s['sd_rel_diff']:.2%} | {s['sem_rel_diff']:.2%} | {s['ratio_of_means']:+.2%} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (.md) and .json")
    args = parser.parse_args()
    groups = collect(args.results)
    summaries = []
    for (comparison, pruner, pattern), entries in sorted(groups.items()):
        entries = sorted(entries, key=lambda e: e["seed"])
        summaries.append(
            {
                "comparison": comparison,
                "pruner": pruner,
                "pattern": pattern,
                **summarise(entries),
                "rows": entries,
            }
        )
    commits = sorted({e["commit"] for entries in groups.values() for e in entries})
    command = " ".join(["python experiments/seed_summary.py", *sys.argv[1:]])
    text = (
        "# Perplexity comparisons averaged over calibration seeds\n\n"
        f"Made by `{command}` from results made at commit(s) {', '.join(commits)}.\n\n" + table(summaries)
    )
    if args.out is not None:  # written before printing: a closed stdout must not lose the files
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(summaries, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
