"""Re-aggregate a finished ``mask_vote`` run's vote counts with another comparison group / weight scaling.

In FedPrLLM one-shot voting the sites' uploads (their local masks) do not depend on ``protocol.group``
or ``protocol.scaling``: those are choices of the server, applied to the per-weight keep counts, which are
all the server learns (also under secure aggregation). A run made with ``protocol.save_votes=true`` keeps
those counts (``votes.safetensors``); this script applies ``vote_model_from_counts_`` (the code the run
itself used) with other choices to the dense model and evaluates it: the same model a new run with those
choices would give, without repeating the sites' local pruning. ``metrics.json`` keeps the source run's
traffic and timing (the same uploads) and records ``revoted_from``. A ``pattern=structured`` run (votes per
unit, no group or scaling to choose) is refused.

Usage: python -m cli.revote RUN_DIR OUT_DIR --group row --scaling true
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from omegaconf import OmegaConf
from safetensors.torch import load_file

from fedprune.aggregation.block import vote_model_from_counts_
from fedprune.config import JobConfig, target_sparsity
from fedprune.job import evaluate, load_model_and_tokenizer, load_run_data, write_outputs
from fedprune.masks import parse_pattern, sparsity_of
from fedprune.models import find_blocks, model_sparsity

logger = logging.getLogger(__name__)


def revote(run_dir: Path, out_dir: Path, group: str, scaling: bool) -> dict:
    """Evaluate the run's counts under ``group``/``scaling``; write ``out_dir`` like a run; its metrics."""
    source = json.loads((run_dir / "metrics.json").read_text())
    if source.get("protocol") != "mask_vote" or not (run_dir / "votes.safetensors").exists():
        raise SystemExit(f"{run_dir} is not a finished mask_vote run with protocol.save_votes=true")
    if source.get("pattern") == "structured":
        raise SystemExit(
            f"{run_dir} is a pattern=structured run: its votes are per unit and protocol.group / "
            "protocol.scaling do not apply to them, so there is nothing to re-vote"
        )
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    cfg.protocol.group, cfg.protocol.scaling = group, scaling
    job = JobConfig.from_mapping(OmegaConf.to_container(cfg, resolve=True))
    start = time.perf_counter()
    model, tokenizer, _ = load_model_and_tokenizer(job)
    data = load_run_data(job, tokenizer)
    counts = load_file(str(run_dir / "votes.safetensors"))
    masks = vote_model_from_counts_(
        model,
        counts,
        int(source["vote_sites"]),
        target_sparsity(job),
        parse_pattern(job.pattern),
        group,
        scaling,
        job.seed,
        job.ignore,
    )
    pruned = evaluate(job, model, data.eval_ids, f"re-voted ({group}, scaling {scaling})")
    blocks_name, _ = find_blocks(model)
    layers = {f"{blocks_name}.{b}.{n}": sparsity_of(m) for b, ms in masks.items() for n, m in ms.items()}
    metrics = {
        **source,
        "group": group,
        "scaling": scaling,
        "ppl_pruned": pruned.value,
        "sparsity_actual": model_sparsity(model, job.ignore),
        "revoted_from": str(run_dir),
        "revote_s": time.perf_counter() - start,
    }
    write_outputs(out_dir, metrics, layers, model if job.save_model else None, tokenizer)
    return metrics


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--group", choices=("layer", "row", "column"), required=True)
    parser.add_argument("--scaling", choices=("true", "false"), required=True)
    args = parser.parse_args()
    metrics = revote(args.run_dir, args.out_dir, args.group, args.scaling == "true")
    print(f"{args.group} scaling={args.scaling}: perplexity {metrics['ppl_pruned']:.3f}")


if __name__ == "__main__":
    main()
