"""Benchmark: fedprune's centralized sequential pruning next to llm-compressor's ``oneshot``, same data.

For each pruner (sparsegpt, wanda) × pattern (unstructured 50%, 2:4) × calibration size, a fresh child
process prunes SmolLM2-135M (fp32) with fedprune (:func:`fedprune.sequential.prune_model_`, in fedprune's
environment) and another with llm-compressor (``oneshot`` with ``SparseGPTModifier`` /
``WandaPruningModifier``, sequential pipeline, in its own virtual environment: it pins its own
transformers). Both get the very same calibration windows (drawn once by fedprune's window sampler from
the bundled corpus, as ``bench_prune.py`` does, passed to the children as a file of token ids), the same
micro-batch size and the same number of threads (``torch.set_num_threads`` and OMP/MKL variables).

Each child reports the prune wall time and process CPU time (around the prune call only: fedprune's
``prune_model_``, llm-compressor's ``oneshot`` with a ready DataLoader; model loading, and llm-compressor's
dataset preprocessing, which is timed apart, are outside), one plain forward pass (with lm_head) over
the same calibration windows in the same process (ratio prune / forward, wall and CPU) and peak RSS
(read before that forward pass). Both pruned models are then scored by the same code, fedprune's
:func:`fedprune.eval.perplexity` in fedprune's environment, on the same held-out windows (the held-out
Shakespeare works, as a fedprune job uses them), with their achieved sparsity (and N:M validity) over the
prunable linear layers of the decoder blocks; the dense model is scored once.

llm-compressor is installed, pinned, into ``$FEDPRUNE_CACHE/venvs/llmcompressor-<version>`` on first use
(idempotent: a complete venv is reused): first ``torch==<--torch>`` (a CPU wheel on this machine's disk),
then llm-compressor with a constraint that keeps that torch.

Usage:
  python experiments/bench_vs_llmcompressor.py                       # full: 128 and 32 windows of 512
  python experiments/bench_vs_llmcompressor.py --quick               # 4 windows of 128, 4 eval windows
  python experiments/bench_vs_llmcompressor.py --windows 32 --pruners sparsegpt --patterns unstructured
The script itself runs in fedprune's environment; ``--worker`` is for its child processes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLMC_VERSION = "0.14.0.1"
TORCH_PIN = "2.13.0"
REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
CORPUS = "shakespeare"
SPARSITY = 0.5
# fedprune's pruner parameters (conf/pruner/sparsegpt.yaml) and llm-compressor's matching arguments
SPARSEGPT_PERCDAMP = 0.01
SPARSEGPT_BLOCKSIZE = 128
TARGETS = "fedprune prune CPU s <= 0.6 x llm-compressor's, and perplexity within 1% of llm-compressor's"


# --------------------------------------------------------------------------------------- helpers


def cache_dir() -> Path:
    return Path(os.environ.get("FEDPRUNE_CACHE", Path.home() / ".cache" / "fedprune"))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.update(TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", FLWR_TELEMETRY_ENABLED="0")
    return env


def timed_prune(prune, model, ids, batch_size: int) -> dict:
    """Wall and CPU seconds of ``prune()`` alone, peak RSS right after it (before the forward pass, whose
    logits would dominate it), then one plain forward pass (with lm_head) over ``ids`` in micro-batches."""
    import torch
    import transformers

    start, start_cpu = time.perf_counter(), time.process_time()
    prune()
    prune_s, prune_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    peak = peak_rss_mb()
    with torch.no_grad():
        start, start_cpu = time.perf_counter(), time.process_time()
        for batch in ids.split(batch_size):
            model(input_ids=batch, use_cache=False)
        forward_s, forward_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attn_implementation": model.config._attn_implementation,
        "prune_s": prune_s,
        "prune_cpu_s": prune_cpu_s,
        "forward_s": forward_s,
        "forward_cpu_s": forward_cpu_s,
        "peak_rss_prune_mb": peak,
    }


# ----------------------------------------------------------------------- llm-compressor's venv


def llmc_venv(cache: Path, version: str = LLMC_VERSION) -> Path:
    return cache / "venvs" / f"llmcompressor-{version}"


def ensure_llmc_venv(cache: Path, version: str = LLMC_VERSION, torch_pin: str = TORCH_PIN) -> Path:
    """The interpreter of llm-compressor's own venv, created and installed (pinned) if not complete."""
    venv = llmc_venv(cache, version)
    python = venv / "bin" / "python"
    marker = venv / ".fedprune-complete"
    if marker.is_file() and python.exists():
        return python
    if venv.exists():  # an interrupted install: start over
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    print(f"installing llmcompressor=={version} (torch=={torch_pin}) into {venv}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, f"torch=={torch_pin}"], check=True)  # the CPU wheel, not a CUDA build
    constraints = venv / "constraints.txt"
    constraints.write_text(f"torch=={torch_pin}\n")
    subprocess.run([*pip, f"llmcompressor=={version}", "-c", str(constraints)], check=True)
    check = "import llmcompressor, torch; print(llmcompressor.__version__, torch.__version__)"
    out = subprocess.run([str(python), "-c", check], check=True, capture_output=True, text=True)
    versions = out.stdout.strip().splitlines()[-1]  # after llm-compressor's own log lines
    print(f"installed: llmcompressor, torch = {versions}", flush=True)
    marker.write_text(versions + "\n")
    return python


# --------------------------------------------------------------------------------- the workers


def sparsity_check(model, pattern: str) -> dict:
    """Achieved sparsity over the prunable layers of the decoder blocks, per-layer range, N:M validity."""
    from fedprune.masks import parse_pattern
    from fedprune.models import find_prunable_layers, get_weight, named_blocks, sparsity_report

    report = sparsity_report(model)
    spec = parse_pattern(pattern)
    layer_sparsity, nm_violations = [], 0
    for _prefix, block in named_blocks(model):
        for layer in find_prunable_layers(block).values():
            weight = get_weight(layer)  # (out, in)
            layer_sparsity.append(float((weight == 0).float().mean()))
            if spec.kind == "nm":
                kept = (weight.reshape(weight.shape[0], -1, spec.m) != 0).sum(-1)  # (out, in / m)
                nm_violations += int((kept > spec.n).sum())
    return {
        "sparsity": report.sparsity,
        "pruned_weights": report.pruned_weights,
        "layers": len(layer_sparsity),
        "layer_sparsity_min": min(layer_sparsity),
        "layer_sparsity_max": max(layer_sparsity),
        "nm_violating_groups": nm_violations if spec.kind == "nm" else None,
        "nm_valid": nm_violations == 0 if spec.kind == "nm" else None,
    }


def evaluate_model(model, spec: dict) -> dict:
    """Held-out perplexity by fedprune's code, and the sparsity check."""
    import torch

    from fedprune.eval import perplexity

    eval_ids = torch.load(spec["eval_ids"])
    start = time.perf_counter()
    result = perplexity(model, eval_ids, spec["batch_size"])
    return {
        "ppl": result.value,
        "eval_tokens": result.tokens,
        "eval_s": time.perf_counter() - start,
        **sparsity_check(model, spec["pattern"]),
    }


def worker_fedprune(spec: dict) -> dict:
    """Prune with fedprune's centralized sequential driver, time it, then evaluate in process."""
    import torch

    set_threads(spec["threads"])
    from fedprune.cpu_attention import attention_backend
    from fedprune.cpu_linear import linear_backend, onednn_available
    from fedprune.data.assets import ensure_model
    from fedprune.masks import parse_pattern
    from fedprune.models import load_causal_lm
    from fedprune.pruners import get_pruner
    from fedprune.sequential import prune_model_

    ids = torch.load(spec["calib_ids"])
    params = (
        {"percdamp": SPARSEGPT_PERCDAMP, "blocksize": SPARSEGPT_BLOCKSIZE}
        if spec["pruner"] == "sparsegpt"
        else {}
    )
    pruner = get_pruner(spec["pruner"], **params)
    rss_before_model = _rss_mb()
    model = load_causal_lm(ensure_model(MODEL))
    pattern = parse_pattern(spec["pattern"])
    measured = timed_prune(
        lambda: prune_model_(model, ids, pruner, SPARSITY, pattern, spec["batch_size"], False),
        model,
        ids,
        spec["batch_size"],
    )
    linears = "oneDNN" if linear_backend() == "onednn" and onednn_available() else "torch (MKL)"
    return {
        "rss_before_model_mb": rss_before_model,
        "block_pass_linears": linears,
        "block_pass_attention": attention_backend(),
        **measured,
        **evaluate_model(model, spec),
    }


def worker_llmc(spec: dict) -> dict:
    """Prune with llm-compressor's oneshot (its venv; imports nothing from fedprune), time it, save."""
    import torch

    set_threads(spec["threads"])
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.args import DatasetArguments
    from llmcompressor.datasets import get_calibration_dataloader
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = torch.load(spec["calib_ids"])  # (windows, seq_len) int64
    windows, seq_len = ids.shape
    batch_size = spec["batch_size"]
    mask_structure = "0:0" if spec["pattern"] == "unstructured" else spec["pattern"]  # N:M = prune N of M
    if mask_structure != "0:0" and mask_structure != "2:4":
        raise ValueError("llm-compressor's N:M prunes N of every M: only 2:4 means the same in both")
    rss_before_model = _rss_mb()
    model = AutoModelForCausalLM.from_pretrained(
        spec["model_path"], dtype=torch.float32, local_files_only=True
    )
    model.eval()
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"], local_files_only=True)
    # llm-compressor's own dataset path (pre-tokenized Dataset -> its sampler and truncation collator),
    # timed apart from the prune
    start = time.perf_counter()
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    dataset_args = DatasetArguments(
        dataset=dataset,
        num_calibration_samples=windows,
        max_seq_length=seq_len,
        batch_size=batch_size,
        shuffle_calibration_samples=False,
    )
    loader = get_calibration_dataloader(dataset_args, tokenizer)
    tokens = sum(int(b["input_ids"].numel()) for b in loader)
    if tokens != ids.numel():
        raise RuntimeError(f"llm-compressor's DataLoader holds {tokens} tokens, not {ids.numel()}")
    preprocess_s = time.perf_counter() - start
    common = {
        "sparsity": SPARSITY,
        "mask_structure": mask_structure,
        "targets": ["Linear"],
        "ignore": ["re:.*lm_head"],  # what fedprune leaves alone too (tied to the embeddings here)
    }
    if spec["pruner"] == "sparsegpt":
        modifier = SparseGPTModifier(
            **common, block_size=SPARSEGPT_BLOCKSIZE, dampening_frac=SPARSEGPT_PERCDAMP
        )
    elif spec["pruner"] == "wanda":
        modifier = WandaPruningModifier(**common)
    else:
        raise ValueError(f"no llm-compressor modifier for {spec['pruner']!r}")
    measured = timed_prune(
        lambda: oneshot(
            model=model,
            processor=tokenizer,
            recipe=modifier,
            dataset=loader,
            batch_size=batch_size,
            num_calibration_samples=windows,
            max_seq_length=seq_len,
            pipeline="sequential",
            sequential_targets=["LlamaDecoderLayer"],
        ),
        model,
        ids,
        batch_size,
    )
    # the decoder blocks' tensors (all llm-compressor changed), for fedprune's evaluation
    state = {k: v.detach() for k, v in model.state_dict().items() if k.startswith("model.layers.")}
    torch.save(state, spec["state_out"])
    return {
        "llmcompressor": llmcompressor.__version__,
        "preprocess_s": preprocess_s,
        "rss_before_model_mb": rss_before_model,
        **measured,
    }


def worker_eval(spec: dict) -> dict:
    """fedprune's evaluation of the dense model, or of it with a saved state of the decoder blocks."""
    import torch
    import transformers

    set_threads(spec["threads"])
    from fedprune.data.assets import ensure_model
    from fedprune.models import load_causal_lm

    model = load_causal_lm(ensure_model(MODEL))
    if spec.get("state"):
        state = torch.load(spec["state"])
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(k.startswith("model.layers.") for k in missing):
            raise RuntimeError(f"state does not fit: missing {missing}, unexpected {unexpected}")
    versions = {"eval_torch": torch.__version__, "eval_transformers": transformers.__version__}
    return {**versions, **evaluate_model(model, spec)}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


WORKERS = {"fedprune": worker_fedprune, "llmc": worker_llmc, "eval": worker_eval}


# ----------------------------------------------------------------------------- the orchestrator


def run_child(python: Path, kind: str, spec: dict, work: Path, name: str, fedprune_env: bool) -> dict:
    """Run one worker in a fresh process (``python``), its output logged to ``work/<name>.log``."""
    spec_path, result_path, log_path = (work / f"{name}.{ext}" for ext in ("spec.json", "result.json", "log"))
    spec_path.write_text(json.dumps(spec))
    env = thread_env(spec["threads"])
    if fedprune_env:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    else:
        env.pop("PYTHONPATH", None)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.run(
            [
                str(python),
                str(Path(__file__).resolve()),
                "--worker",
                kind,
                "--spec",
                str(spec_path),
                "--result",
                str(result_path),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(work),
        ).returncode
    if code != 0:
        tail = log_path.read_text().splitlines()[-40:]
        raise RuntimeError(f"{name} failed ({code}); log {log_path}:\n" + "\n".join(tail))
    result = json.loads(result_path.read_text())
    result["child_wall_s"] = time.perf_counter() - start
    print(
        f"  {name}: {json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float))})}",
        flush=True,
    )
    return result


def draw_windows(
    windows: list[int], seq_len: int, eval_windows: int | None, work: Path, seed: int = 0
) -> dict:
    """Calibration windows per size (fedprune's sampler, ``seed``; 0 as bench_prune.py) and eval windows."""
    import torch

    from fedprune.data.assets import ensure_corpus, ensure_model
    from fedprune.data.corpus import load_works, split_works
    from fedprune.data.windows import eval_windows as cut_eval_windows
    from fedprune.data.windows import sample_windows, tokenize_works
    from fedprune.models import load_tokenizer

    tokenizer = load_tokenizer(ensure_model(MODEL))
    calib, held_out = split_works(load_works(ensure_corpus(CORPUS)))
    calib_docs = tokenize_works(tokenizer, calib)
    paths = {}
    for n in windows:
        paths[n] = work / f"calib_{n}x{seq_len}.pt"
        torch.save(sample_windows(calib_docs, n, seq_len, seed=seed), paths[n])
    eval_ids = cut_eval_windows(tokenize_works(tokenizer, held_out), seq_len, eval_windows)
    torch.save(eval_ids, work / "eval.pt")
    return {
        "calib": paths,
        "eval": work / "eval.pt",
        "eval_windows": int(eval_ids.shape[0]),
        "held_out": sorted(held_out),
    }


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def build_rows(args, data: dict, llmc_python: Path, work: Path) -> tuple[dict, list[dict]]:
    from fedprune.data.assets import ensure_model

    model_path = str(ensure_model(MODEL))
    base = {
        "threads": args.threads,
        "batch_size": args.batch_size,
        "eval_ids": str(data["eval"]),
        "model_path": model_path,
    }
    print("dense evaluation", flush=True)
    dense = run_child(Path(sys.executable), "eval", {**base, "pattern": "unstructured"}, work, "dense", True)
    rows = []
    for n in args.windows:
        for pruner in args.pruners:
            for pattern in args.patterns:
                tag = f"{pruner}_{pattern.replace(':', 'of')}_{n}x{args.seq_len}"
                print(f"row {tag}", flush=True)
                spec = {**base, "pruner": pruner, "pattern": pattern, "calib_ids": str(data["calib"][n])}
                row_start = time.perf_counter()
                fed = run_child(Path(sys.executable), "fedprune", spec, work, f"{tag}.fedprune", True)
                state = work / f"{tag}.llmc_state.pt"
                llmc = run_child(
                    llmc_python, "llmc", {**spec, "state_out": str(state)}, work, f"{tag}.llmc", False
                )
                scored = run_child(
                    Path(sys.executable),
                    "eval",
                    {**spec, "state": str(state)},
                    work,
                    f"{tag}.llmc_eval",
                    True,
                )
                scored["eval_child_wall_s"] = scored.pop("child_wall_s")
                llmc.update(scored)
                state.unlink()
                rows.append(
                    _row(pruner, pattern, n, args.seq_len, fed, llmc, time.perf_counter() - row_start)
                )
    return dense, rows


def _row(pruner: str, pattern: str, windows: int, seq_len: int, fed: dict, llmc: dict, row_s: float) -> dict:
    for r in (fed, llmc):
        r["prune_over_forward"] = r["prune_s"] / r["forward_s"]
        r["prune_over_forward_cpu"] = r["prune_cpu_s"] / r["forward_cpu_s"]
    cpu_ratio = fed["prune_cpu_s"] / llmc["prune_cpu_s"]
    ppl_rel = fed["ppl"] / llmc["ppl"] - 1.0
    return {
        "pruner": pruner,
        "pattern": pattern,
        "windows": windows,
        "seq_len": seq_len,
        "fedprune": fed,
        "llmcompressor": llmc,
        "cpu_ratio_fedprune_over_llmc": cpu_ratio,
        "wall_ratio_fedprune_over_llmc": fed["prune_s"] / llmc["prune_s"],
        "ppl_rel_diff": ppl_rel,
        "cpu_target_met": cpu_ratio <= 0.6,
        "ppl_target_met": abs(ppl_rel) <= 0.01,
        "row_wall_s": row_s,
    }


def write_report(args, command: str, data: dict, dense: dict, rows: list[dict], versions: dict) -> str:
    def sp(r: dict) -> str:
        nm = (
            ""
            if r["nm_valid"] is None
            else (" ✓2:4" if r["nm_valid"] else f" ✗ {r['nm_violating_groups']} groups")
        )
        return f"{r['sparsity']:.4f}{nm}"

    lines = [
        "# fedprune vs llm-compressor: prune time, memory and perplexity, SmolLM2-135M (fp32)",
        "",
        f"Made by `{command}` at commit `{data['commit']}` on {time.strftime('%Y-%m-%d')}, "
        f"{args.threads} thread(s) per child (`torch.set_num_threads`, OMP/MKL/OpenBLAS variables), "
        f"micro-batch {args.batch_size}, calibration windows of {args.seq_len} tokens (fedprune's sampler, "
        f"seed {args.seed}, from the calibration works), perplexity on {data['eval_windows']} held-out windows of "
        f"{args.seq_len} ({', '.join(data['held_out'])}).",
        "",
        f"- fedprune's venv: torch {versions['fedprune']['torch']}, transformers {versions['fedprune']['transformers']}; "
        f"float32 linears of its block passes: {versions['fedprune'].get('block_pass_linears', 'torch (MKL)')} "
        "(`fedprune.cpu_linear`, `FEDPRUNE_LINEAR`); causal attention of its block passes: "
        f"{versions['fedprune'].get('block_pass_attention', 'torch')} (`fedprune.cpu_attention`, `FEDPRUNE_ATTENTION`)",
        f"- llm-compressor's venv: llmcompressor {versions['llmc'].get('llmcompressor')}, torch "
        f"{versions['llmc']['torch']}, transformers {versions['llmc']['transformers']}",
        "- Every measurement is its own child process. Prune time: fedprune `prune_model_`; llm-compressor "
        "`oneshot` (sequential pipeline, its subgraph tracing, both calibration passes per block and pruning) "
        "with a ready DataLoader: model loading is outside, and llm-compressor's dataset preprocessing is "
        "timed apart (`preprocess_s` in the JSON). Forward: one plain forward pass (with lm_head) over the "
        "same windows, after pruning, in the same process. Peak RSS is read before that forward pass.",
        "- Both pruned models are scored by fedprune's `fedprune.eval.perplexity` in fedprune's venv; "
        "sparsity is over the prunable linear layers of the 30 decoder blocks.",
        "- Concurrent processes on this 2-core machine distort wall times, multi-threaded ones most: "
        "compare CPU seconds at one thread, or run alone.",
        "",
        f"Issue targets: {TARGETS}.",
        "",
        f"Dense perplexity: {dense['ppl']:.3f} ({dense['eval_tokens']} tokens; dense sparsity {dense['sparsity']:.4f}).",
        "",
        "| pruner | pattern | windows | fedprune CPU s | llmc CPU s | CPU fedprune / llmc | fedprune wall s | llmc wall s "
        "| prune / forward CPU fedprune | llmc | peak RSS MB fedprune | llmc | ppl fedprune | ppl llmc | ppl rel. diff "
        "| sparsity fedprune | llmc | targets (CPU, ppl) | row s (all its children) |",
        "|" + " --- |" * 19,
    ]
    for r in rows:
        f, c = r["fedprune"], r["llmcompressor"]
        lines.append(
            f"| {r['pruner']} | {r['pattern']} | {r['windows']}×{r['seq_len']} | {f['prune_cpu_s']:.1f} | {c['prune_cpu_s']:.1f} "
            f"| {r['cpu_ratio_fedprune_over_llmc']:.2f} | {f['prune_s']:.1f} | {c['prune_s']:.1f} "
            f"| {f['prune_over_forward_cpu']:.2f} | {c['prune_over_forward_cpu']:.2f} "
            f"| {f['peak_rss_prune_mb']:.0f} | {c['peak_rss_prune_mb']:.0f} | {f['ppl']:.3f} | {c['ppl']:.3f} "
            f"| {100 * r['ppl_rel_diff']:+.2f}% | {sp(f)} | {sp(c)} "
            f"| {'met' if r['cpu_target_met'] else 'not met'}, {'met' if r['ppl_target_met'] else 'not met'} "
            f"| {r['row_wall_s']:.0f} |"
        )
    lines += [
        "",
        "Hyperparameters: sparsity 0.5 (2:4 keeps 2 of every 4 inputs per output row in both: llm-compressor's "
        '`mask_structure="2:4"` prunes N=2 of M=4); SparseGPT damping 0.01 × mean(diag H) '
        "(`percdamp` / `dampening_frac`), 128-column blocks (`blocksize` / `block_size`); lm_head left dense in "
        "both. Differences the APIs leave: llm-compressor accumulates H in float32 (fedprune: float64 sums), "
        "calibrates under eager attention (fedprune: the model's sdpa), runs each block twice (calibration "
        "pass, then a propagation pass after pruning; fedprune's statistics pass stops at the last prunable "
        "layer's input), and its unstructured SparseGPT prunes every weight at or below the k-th smallest "
        "score (k = ⌊0.5·n⌋, so one more per block, plus ties), fedprune exactly k per 128-column block.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", default="128,32", help="calibration window counts, comma-separated")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32, help="held-out windows (0 = all)")
    parser.add_argument("--pruners", default="sparsegpt,wanda")
    parser.add_argument("--patterns", default="unstructured,2:4")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration window sampler")
    parser.add_argument("--torch", default=TORCH_PIN, help="torch pin of llm-compressor's venv")
    parser.add_argument(
        "--quick", action="store_true", help="--windows 4 --seq-len 128 --eval-windows 4, *_quick files"
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--keep-work", action="store_true", help="keep the children's logs and specs")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = WORKERS[args.worker](json.loads(args.spec.read_text()))
        args.result.write_text(json.dumps(result, indent=2))
        return
    command = "python experiments/bench_vs_llmcompressor.py " + " ".join(sys.argv[1:])
    if args.quick:
        args.windows, args.seq_len, args.eval_windows = "4", 128, 4
    args.windows = [int(n) for n in str(args.windows).split(",")]
    args.pruners = args.pruners.split(",")
    args.patterns = args.patterns.split(",")
    for pattern in args.patterns:
        if pattern not in ("unstructured", "2:4"):
            raise SystemExit(
                f"pattern {pattern!r}: only unstructured and 2:4 mean the same in both libraries"
            )
    out = args.out or Path("experiments/results/bench_vs_llmcompressor" + ("_quick" if args.quick else ""))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    llmc_python = ensure_llmc_venv(cache_dir(), LLMC_VERSION, args.torch)
    work = Path(tempfile.mkdtemp(prefix="bench_vs_llmc_", dir=cache_dir()))
    try:
        data = draw_windows(args.windows, args.seq_len, args.eval_windows or None, work, args.seed)
        data["commit"] = git_commit()
        dense, rows = build_rows(args, data, llmc_python, work)
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"children's logs kept in {work}")
    versions = {"fedprune": rows[0]["fedprune"], "llmc": rows[0]["llmcompressor"]} if rows else {}
    report = write_report(args, command, data, dense, rows, versions)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(report)
    summary = {
        "command": command,
        "commit": data["commit"],
        "threads": args.threads,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "eval_windows": data["eval_windows"],
        "dense": dense,
        "rows": rows,
    }
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(report)


if __name__ == "__main__":
    main()
