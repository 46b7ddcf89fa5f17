"""Pieces every LLM protocol's job shares: resolving assets, building windows, evaluating, metrics, outputs.

Everything takes the typed :class:`fedprune.config.JobConfig`; nothing here knows Flower or Hydra.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedprune.config import ConfigError, JobConfig, build_pruner, target_sparsity
from fedprune.data.assets import resolve_corpus_path, resolve_model_path
from fedprune.data.corpus import load_works, split_works
from fedprune.data.sites import pooled_windows
from fedprune.data.windows import eval_windows, tokenize_works
from fedprune.eval import Perplexity, perplexity
from fedprune.masks import Pattern, parse_pattern
from fedprune.models import (
    IgnorePatternError,
    UnprunableParameterError,
    check_prunable,
    find_blocks,
    load_causal_lm,
    load_tokenizer,
    sparsity_report,
)
from fedprune.offload import (
    BlockSaver,
    OffloadedBlocks,
    TensorSource,
    load_offloaded,
    offloaded_blocks,
    offloaded_perplexity,
)
from fedprune.outputs import peak_rss_mb, save_model_atomic, write_json_atomic
from fedprune.pruners import Pruner
from fedprune.sequential import BlockAccess, BlockCheckpoints, PruneReport, ResidentBlocks, prune_model_
from fedprune.speed import SpeedFigures, measure_speed, speed_metrics
from fedprune.structured.decide import Structure
from fedprune.structured.saved import (
    STRUCTURE_FILE,
    config_updates,
    finalize_config_,
    realised_fractions,
    structure_record,
)

logger = logging.getLogger(__name__)


@dataclass
class RunData:
    """Tokenized calibration works (never evaluated on) and the fixed held-out evaluation windows."""

    calib_docs: dict[str, torch.Tensor]
    eval_ids: torch.Tensor  # (windows, seq_len)


def load_run_data(job: JobConfig, tokenizer: object) -> RunData:
    """Tokenize the corpus, split off the held-out works and cut the evaluation windows."""
    works = load_works(resolve_corpus_path(job.data.path))
    calib_works, eval_works = split_works(works, list(job.data.heldout))
    calib_docs = tokenize_works(tokenizer, calib_works)
    eval_docs = tokenize_works(tokenizer, eval_works)
    return RunData(calib_docs, eval_windows(eval_docs, job.data.seq_len, job.data.eval_windows))


def calibration_windows(job: JobConfig, docs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The pooled calibration set: every site's windows stacked (``federation.num_clients`` sites,
    ``federation.partitioner``), so a centralized run uses exactly the data a federation would."""
    fed = job.federation
    return pooled_windows(
        fed.partitioner, docs, fed.num_clients, job.data.calib_windows, job.data.seq_len, job.seed
    )


def load_model_and_tokenizer(job: JobConfig) -> tuple[torch.nn.Module, object, Path]:
    """The model (eval mode, on ``job.device``), its tokenizer and its folder."""
    path = resolve_model_path(job.model.path)
    model = load_causal_lm(path, dtype=getattr(torch, job.model.dtype)).to(job.device)
    return model, load_tokenizer(path), path


def load_model(job: JobConfig) -> tuple[torch.nn.Module, object, TensorSource | None]:
    """The model, its tokenizer and, with ``model.offload``, where its decoder blocks are (then they are
    on ``meta``)."""
    if not job.model.offload:
        model, tokenizer, _ = load_model_and_tokenizer(job)
        return model, tokenizer, None
    path = resolve_model_path(job.model.path)
    model, source = load_offloaded(path, getattr(torch, job.model.dtype))
    return model, load_tokenizer(path), source


def evaluate(
    job: JobConfig,
    model: torch.nn.Module,
    eval_ids: torch.Tensor,
    label: str,
    source: TensorSource | None = None,
):
    """Held-out perplexity, logged (``source``: the offloaded model's blocks, run one at a time)."""
    if source is None:
        result = perplexity(model, eval_ids, job.eval_batch_size, progress=job.progress)
    else:
        result = offloaded_perplexity(model, source, eval_ids, job.eval_batch_size, progress=job.progress)
    logger.info("%s perplexity %.3f over %d tokens", label, result.value, result.tokens)
    return result


def write_outputs(
    out_dir: Path,
    metrics: dict,
    layer_sparsity: dict[str, float],
    model: torch.nn.Module | None,
    tokenizer: object | None,
    blocks: BlockAccess | None = None,
    extra_json: dict[str, object] | None = None,
    config_updates: dict[str, object] | None = None,
) -> None:
    """``model/`` first, then ``sparsity.json``, then ``metrics.json`` (its presence means complete).

    ``blocks``: the access the model was pruned through; an offloaded model's folder was written block by
    block and is moved into place here (or deleted when ``model`` is None). ``extra_json``: more files in
    ``model/`` (a structurally pruned model's shapes), ``config_updates``: keys changed in its config.json."""
    saver = blocks.saver if isinstance(blocks, OffloadedBlocks) else None
    if saver is not None and model is not None:
        saver.commit()
    elif saver is not None:
        saver.discard()
    elif model is not None:
        save_model_atomic(model, tokenizer, out_dir / "model", extra_json, config_updates)
    write_json_atomic(out_dir / "sparsity.json", layer_sparsity)
    write_json_atomic(out_dir / "metrics.json", metrics)


def summary_table(metrics: dict) -> str:
    """A short dense-vs-pruned table for the terminal."""
    rows = [
        ("model", metrics["model"]),
        ("protocol", metrics.get("protocol", "centralized")),
        ("pruner / pattern", f"{metrics['pruner']} / {metrics['pattern']}"),
        (
            (
                "params dense / pruned",
                f"{metrics['params_dense'] / 1e6:.1f} M / {metrics['params_pruned'] / 1e6:.1f} M",
            )
            if "params_pruned" in metrics
            else ("sparsity (actual)", f"{metrics['sparsity']:.3f} ({metrics['sparsity_actual']:.4f})")
        ),
        ("perplexity dense", f"{metrics['ppl_dense']:.3f}"),
        ("perplexity pruned", f"{metrics['ppl_pruned']:.3f}"),
        *(
            [
                (
                    "speed pruned / dense",
                    f"prefill {metrics['speed']['prefill_speedup']:.2f}x, "
                    f"decode {metrics['speed']['decode_speedup']:.2f}x",
                )
            ]
            if "speed" in metrics
            else []
        ),
        ("tokens calib / eval", f"{metrics['calib_tokens']} / {metrics['eval_tokens']}"),
    ]
    if metrics.get("num_clients"):
        rows += [
            ("sites / rounds", f"{metrics['num_clients']} / {metrics['rounds']}"),
            (
                "bytes per site up / down",
                f"{metrics['bytes_up_per_client'] / 1e6:.2f} MB / {metrics['bytes_down_per_client'] / 1e6:.2f} MB",
            ),
        ]
    if metrics.get("rejected"):
        rows.append(("rejected replies", str(len(metrics["rejected"]))))
    rows.append(("wall time", f"{metrics['wall_s']:.1f} s"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


@dataclass
class Prepared:
    """What every protocol's job starts from: the method, the dense model, the data, dense perplexity."""

    pruner: Pruner
    pattern: Pattern
    model: torch.nn.Module
    tokenizer: object
    data: RunData
    dense: Perplexity
    start: float = field(default_factory=time.perf_counter)
    source: TensorSource | None = None  # model.offload: where the model's blocks are (dense, then pruned)
    structure: Structure | None = None  # pattern=structured: the units removed from every block
    params_dense: int = 0
    loads_with_from_pretrained: bool = True  # after pruned_: the saved folder needs no fedprune.load_pruned
    speed_dense: SpeedFigures | None = None  # speed.measure: the dense model's, taken before pruning

    def evaluate(self, job: JobConfig, label: str) -> Perplexity:
        """Held-out perplexity of the model as it is now."""
        return evaluate(job, self.model, self.data.eval_ids, label, self.source)

    def pruning_blocks(self, out_dir: Path) -> BlockAccess:
        """The blocks a protocol prunes: the model's own, or (offload) materialised from ``source`` one at
        a time and saved block by block into a temporary ``out_dir/model`` (see :func:`write_outputs`)."""
        if self.source is None:
            return ResidentBlocks(self.model)
        return OffloadedBlocks(
            self.model, self.source, BlockSaver(self.model, out_dir / "model", self.tokenizer)
        )

    def pruned_(self, blocks: BlockAccess) -> None:
        """After pruning through ``blocks``: an offloaded model's blocks now come from the saved folder."""
        if isinstance(blocks, OffloadedBlocks):
            self.source = blocks.saver.finish()
        if self.structure is not None:
            self.loads_with_from_pretrained = finalize_config_(
                self.model, self.structure.family, self.structure.shape
            )

    @property
    def model_files(self) -> dict[str, object]:
        """Files saved beside the model's own: a structurally pruned model's layer shapes."""
        if self.structure is None:
            return {}
        return {STRUCTURE_FILE: structure_record(self.model, self.loads_with_from_pretrained)}

    @property
    def config_updates(self) -> dict[str, object]:
        """Keys changed in the saved config.json (a model type ``from_pretrained`` refuses, naming
        ``fedprune.load_pruned``, where the config cannot state the pruned shapes)."""
        if self.structure is None:
            return {}
        return config_updates(self.model, self.loads_with_from_pretrained)


def prune_with_job_(
    job: JobConfig,
    prep: Prepared,
    model: torch.nn.Module,
    calib_ids: torch.Tensor,
    blocks: BlockAccess | None = None,
    checkpoints: BlockCheckpoints | None = None,
) -> PruneReport:
    """Sequential pruning of ``model`` in place with the job's method (``blocks``: where its blocks live;
    ``checkpoints``: where each pruned block is saved, and finished ones restored from)."""
    sparsity = target_sparsity(job)
    return prune_model_(
        model,
        calib_ids,
        prep.pruner,
        sparsity,
        prep.pattern,
        job.batch_size,
        job.progress,
        ignore=job.ignore,
        blocks=blocks,
        structure=prep.structure,
        allocation=job.allocation.rule(),
        checkpoints=checkpoints,
    )


def discard_(blocks: BlockAccess) -> None:
    """Delete an offloaded run's temporary model folder (nothing once committed or in memory)."""
    if isinstance(blocks, OffloadedBlocks) and blocks.saver is not None:
        blocks.saver.discard()


def prepare(job: JobConfig) -> Prepared:
    """Build the pruner, load model, tokenizer and data, and evaluate the dense model."""
    start = time.perf_counter()
    if job.threads is not None:
        torch.set_num_threads(job.threads)
    pruner = build_pruner(job.pruner)
    model, tokenizer, source = load_model(job)
    try:
        check_prunable(model, job.ignore)
    except (IgnorePatternError, UnprunableParameterError) as error:
        raise ConfigError(f"config key 'ignore': {error}") from None
    pattern = parse_pattern(job.pattern)
    structure = None
    if pattern.kind == "structured":
        spec = job.structured
        structure = Structure.for_model(model, spec.ffn, spec.heads, spec.blocks, spec.attention)
    data = load_run_data(job, tokenizer)
    dense = evaluate(job, model, data.eval_ids, "dense", source)
    return Prepared(
        pruner,
        pattern,
        model,
        tokenizer,
        data,
        dense,
        start,
        source,
        structure,
        parameter_count(model),
        speed_dense=model_speed(job, model, data.eval_ids, "dense"),
    )


def model_speed(
    job: JobConfig, model: torch.nn.Module, eval_ids: torch.Tensor, label: str
) -> SpeedFigures | None:
    """``speed.measure``: the model's prefill / decode speed (:mod:`fedprune.speed`), else None."""
    spec = job.speed
    if not spec.measure:
        return None
    logger.info("measuring %s speed (%d timed runs each)", label, spec.repeats)
    return measure_speed(
        model, eval_ids, spec.prefill_len or job.data.seq_len, spec.prompt_len, spec.new_tokens, spec.repeats
    )


def allocation_metrics(result) -> dict:
    """A non-uniform allocation's per-block sparsities and scores (an ``Allocated``; {} if None)."""
    if result is None:
        return {}
    return {"block_sparsity": result.block_sparsity, "block_allocation_score": result.block_score}


def parameter_count(model: torch.nn.Module) -> int:
    """Number of parameters (a tied embedding counted once)."""
    return sum(p.numel() for p in model.parameters())


def structured_metrics(prep: Prepared) -> dict:
    """Parameters before and after, the fractions removed as realised in the model, the units asked for."""
    structure = prep.structure
    return {
        "params_dense": prep.params_dense,
        "params_pruned": parameter_count(prep.model),
        **realised_fractions(prep.model, structure.family, structure.shape),
        "blocks_removed": structure.dense_blocks - len(find_blocks(prep.model)[1]),
        "structured_units_per_block": structure.counts(),
        "loads_with_from_pretrained": prep.loads_with_from_pretrained,
    }


def privacy_metrics(privacy: str, plan) -> dict:
    """``privacy`` and, with secure aggregation, its threshold and fixed-point scale; with DP, the
    achieved ``dp_epsilon``, ``dp_delta`` and the noise std of the sum ``dp_sigma`` (a ``SecurePlan``)."""
    metrics: dict = {"privacy": privacy}
    if plan is not None:
        metrics.update(secagg_threshold=plan.threshold, secagg_scale_bits=plan.value_code().scale_bits)
    if plan is not None and plan.dp_sigma > 0:
        metrics.update(dp_epsilon=plan.dp_epsilon, dp_delta=plan.dp_delta, dp_sigma=plan.dp_sigma)
    return metrics


def base_metrics(job: JobConfig, prep: Prepared, ppl_pruned: float, calib_tokens: int, **extra) -> dict:
    """The metrics every protocol reports, then protocol-specific ``extra`` ones, then timing and memory.

    ``sparsity_actual`` is over the ``pruned_weights`` of the pruned layers; ``ignored_weights`` (and
    ``ignored_layers``) were left dense on purpose; ``block_parameters_covered`` is the pruned share of
    all decoder-block parameters (norms and biases are never pruned)."""
    blocks = None if prep.source is None else offloaded_blocks(prep.model, prep.source)
    report = sparsity_report(prep.model, job.ignore, blocks)
    pruned_speed = model_speed(job, prep.model, prep.data.eval_ids, "pruned") if prep.speed_dense else None
    metrics = {
        "model": job.model.name,
        "dtype": job.model.dtype,
        "threads": torch.get_num_threads(),
        "protocol": job.protocol_name,
        "pruner": prep.pruner.name,
        "pattern": str(prep.pattern),
        "sparsity": target_sparsity(job),
        "allocation": job.allocation.name,
        "sparsity_actual": report.sparsity,
        "pruned_weights": report.pruned_weights,
        "ignored_weights": report.ignored_weights,
        "block_parameters_covered": report.coverage,
        "ppl_dense": prep.dense.value,
        "ppl_pruned": ppl_pruned,
        "calib_tokens": calib_tokens,
        "eval_tokens": prep.dense.tokens,
        **({"ignored_layers": sorted(report.ignored)} if report.ignored else {}),
        **(structured_metrics(prep) if prep.structure is not None else {}),
        **extra,
    }
    if pruned_speed is not None:
        metrics["speed"] = speed_metrics(prep.speed_dense, pruned_speed, job.speed.settings(job.data.seq_len))
    metrics.update(wall_s=time.perf_counter() - prep.start, peak_rss_mb=peak_rss_mb(), seed=job.seed)
    return metrics
