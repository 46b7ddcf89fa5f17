"""Behaviour fingerprint: run a fixed grid of small real jobs and record what each produced, bit for bit.

For a refactor that must not change behaviour: run it on the commit before and on the commit after, then
compare the two JSON files (``--compare A B``). Each job is the ``fedprune`` job itself (``cli.main.run``)
on the bundled SmolLM2-135M and Shakespeare at a small scale (4 sites, 8 windows of 64 tokens, 2
evaluation windows); a row holds the job's perplexities, sparsity, tokens, sites, bytes and rounds, and
the SHA-256 of the saved ``model.safetensors`` (the pruned weights, bit for bit). Runs with DP noise are
left out (their noise comes from OS entropy by design); HideNseek runs 2 rounds.

Usage:
  python experiments/fingerprint.py OUT.json [--only NAME ...]
  python experiments/fingerprint.py --compare BEFORE.json AFTER.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SMALL = [
    "federation.num_clients=4",
    "federation.min_clients=3",
    "data.calib_windows=8",
    "data.seq_len=64",
    "data.eval_windows=2",
    "progress=false",
]

# name -> overrides (on top of SMALL)
JOBS: dict[str, list[str]] = {
    "centralized_magnitude": ["protocol=centralized", "pruner=magnitude"],
    "centralized_wanda": ["protocol=centralized", "pruner=wanda"],
    "centralized_sparsegpt": ["protocol=centralized", "pruner=sparsegpt"],
    "centralized_sparsegpt_2-4": ["protocol=centralized", "pruner=sparsegpt", "pattern=2:4"],
    "local_wanda": ["protocol=local", "pruner=wanda"],
    "stats_sync_wanda": ["protocol=stats_sync", "pruner=wanda"],
    "stats_sync_sparsegpt": ["protocol=stats_sync", "pruner=sparsegpt"],
    "stats_sync_wanda_secagg": ["protocol=stats_sync", "pruner=wanda", "privacy=secagg"],
    "stats_sync_sparsegpt_secagg": ["protocol=stats_sync", "pruner=sparsegpt", "privacy=secagg"],
    "mask_vote_wanda": ["protocol=mask_vote", "pruner=wanda", "protocol.group=row", "protocol.scaling=true"],
    "mask_vote_wanda_secagg": ["protocol=mask_vote", "pruner=wanda", "privacy=secagg"],
    "mask_vote_sync_sparsegpt": ["protocol=mask_vote_sync", "pruner=sparsegpt", "pattern=2:4"],
    "mask_vote_sync_wanda_secagg": ["protocol=mask_vote_sync", "pruner=wanda", "privacy=secagg", "protocol.scaling=true"],
    "hidenseek": ["protocol=hidenseek", "protocol.rounds=2", "protocol.local_epochs=1"],
}

KEYS = (
    "ppl_dense",
    "ppl_pruned",
    "ppl_per_client",
    "sparsity",
    "sparsity_actual",
    "calib_tokens",
    "eval_tokens",
    "num_clients",
    "rounds",
    "bytes_up_per_client",
    "bytes_down_per_client",
    "accuracy",
    "mean_bytes_up_per_client_round",
    "kept_weights",
)


def _sha256(path: Path) -> str | None:
    if not path.exists():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_job(name: str, overrides: list[str]) -> dict:
    """One job in a temporary folder: the fingerprint row."""
    sys.path.insert(0, str(ROOT))
    from hydra import compose, initialize_config_dir

    from cli.main import run

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=SMALL + overrides)
    out = Path(tempfile.mkdtemp(prefix=f"fingerprint_{name}_"))
    try:
        metrics = run(cfg, out)
        row = {key: metrics[key] for key in KEYS if key in metrics}
        row["model_sha256"] = _sha256(out / "model" / "model.safetensors")
        sparsity = out / "sparsity.json"
        row["layer_sparsity_sha256"] = _sha256(sparsity)
        return row
    finally:
        shutil.rmtree(out, ignore_errors=True)


def compare(before: Path, after: Path) -> int:
    """Print every difference; exit status 1 if any."""
    a, b = json.loads(before.read_text())["rows"], json.loads(after.read_text())["rows"]
    differences = 0
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            print(f"{name}: only in {'after' if name in b else 'before'}")
            differences += 1
            continue
        for key in sorted(set(a[name]) | set(b[name])):
            if a[name].get(key) != b[name].get(key):
                print(f"{name}.{key}: {a[name].get(key)!r} -> {b[name].get(key)!r}")
                differences += 1
    print(f"{len(set(a) & set(b))} jobs compared, {differences} differences")
    return 1 if differences else 0


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        raise SystemExit(compare(*args.compare))
    rows = json.loads(args.out.read_text())["rows"] if args.out.exists() else {}
    for name, overrides in JOBS.items():
        if args.only and name not in args.only or name in rows:
            continue
        print(f"running {name}", flush=True)
        rows[name] = run_job(name, overrides)
        args.out.write_text(json.dumps({"jobs": JOBS, "small": SMALL, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
