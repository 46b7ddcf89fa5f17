"""Collect ``metrics.json`` files under a folder into a markdown table (and a JSON list).

Usage: python experiments/make_table.py RUN_DIR OUT_PREFIX [--command "..."]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = [
    ("protocol", "protocol", "{}"),
    ("group", "group", "{}"),
    ("scaling", "scaling", "{}"),
    ("pruner", "pruner", "{}"),
    ("pattern", "pattern", "{}"),
    ("sparsity", "sparsity_actual", "{:.3f}"),
    ("ppl dense", "ppl_dense", "{:.2f}"),
    ("ppl pruned", "ppl_pruned", "{:.2f}"),
    ("× dense", None, "{:.2f}"),
    ("calib tokens", "calib_tokens", "{}"),
    ("eval tokens", "eval_tokens", "{}"),
    ("up bytes/client", "bytes_up_per_client", "{:.0f}"),
    ("prune s", "prune_s", "{:.0f}"),
    ("wall s", "wall_s", "{:.0f}"),
]


def load_metrics(root: Path) -> list[dict]:
    """Every metrics.json below ``root``, sorted by pattern, protocol and pruner."""
    rows = [json.loads(p.read_text()) for p in sorted(root.rglob("metrics.json"))]
    return sorted(rows, key=lambda m: (m.get("pattern", ""), m.get("protocol", ""), m.get("pruner", "")))


def markdown(rows: list[dict]) -> str:
    """A markdown table of the rows."""
    lines = ["| " + " | ".join(c[0] for c in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for m in rows:
        cells = []
        for _, key, fmt in COLUMNS:
            value = m["ppl_pruned"] / m["ppl_dense"] if key is None else m.get(key, "")
            cells.append("" if value in ("", None) else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_prefix", type=Path)
    parser.add_argument("--command", default="")
    parser.add_argument("--title", default="Results")
    args = parser.parse_args()
    rows = load_metrics(args.run_dir)
    text = f"# {args.title}\n\nMade by:\n\n```bash\n{args.command}\n```\n\n{markdown(rows)}\n"
    args.out_prefix.with_suffix(".md").write_text(text)
    args.out_prefix.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
