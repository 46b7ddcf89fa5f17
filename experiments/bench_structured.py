"""Benchmark: structured pruning (``pattern=structured``): what it costs in perplexity, what it buys in CPU
speed, memory and size.

``speed``: any two HF model folders (a dense one, a pruned one), each measured in its own child process
(so that peak RSS, ``resource.getrusage`` maxrss, is per model) with the same torch threads and the same
token ids (cut from the bundled held-out Shakespeare works, as a fedprune job cuts its evaluation
windows): CPU prefill tokens/s on windows of ``--prefill-len`` tokens (batches of ``--batches`` windows;
one forward with the KV cache on and next-token logits only, as ``generate`` prefills), and greedy decode
tokens/s (``model.generate(do_sample=False, max_new_tokens=N, min_new_tokens=N)``, KV cache on, from a
``--prompt-len`` prompt: N / the whole call). Each child warms up once, then times ``--repeats`` runs;
``--rounds`` children per model run interleaved in ABBA order (dense, pruned, pruned, dense, ...) so that
drift on a shared machine hits both alike; the median over all of a model's runs is reported, with the
speedup pruned / dense (and its range over the rounds). Also: parameter count (tied weights once), bytes
of the folder and of its weight files, load time.

``sweep``: for each method in ``--methods`` and each shape of the table ``SHAPES`` below, one real
``fedprune protocol=centralized pattern=structured ...`` run (its own process), its metrics.json
(perplexities, prune time, parameter counts), then ``speed`` on its ``model/`` folder against the dense
model. A run that fails (non-zero exit, e.g. a method or shape not supported yet) is a row with the last
line of its error. Writes ``experiments/results/bench_structured.{md,json,png}`` (the plot: perplexity
ratio, log scale, against the measured prefill speedup, one marker per method; skipped with a note when
matplotlib is missing). A run whose metrics.json (and speed.json) is already in ``--runs`` is reused.

``slice-ffn``: a physically smaller model made by hand, for checking ``speed`` without the pruner: keeps
the first fraction of every MLP's intermediate channels (rows of gate/up, columns of down), no calibration.

Usage:
  python experiments/bench_structured.py speed --dense smollm2-135m --pruned OUT/model [--threads 1]
      [--repeats 5] [--rounds 2] [--batches 1,4] [--out experiments/results/bench_structured_speed]
  python experiments/bench_structured.py sweep [--methods magnitude,wanda,variance,sparsegpt,obs]
      [--shapes ffn0.5,ffn0.5_h0.33,blocks4] [--windows 128] [--threads 1] [--repeats 5]
  python experiments/bench_structured.py sweep --quick    # 4 windows, 2 shapes, 2 methods, repeats 2
  python experiments/bench_structured.py slice-ffn --keep 0.5 --out /tmp/smollm2_half_ffn
Models are loaded with ``fedprune.load_pruned`` (or ``fedprune.structured.load.load_pruned``) when this
checkout has it (per-block widths may differ), else ``AutoModelForCausalLM.from_pretrained``. ``--worker`` is for the child processes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DENSE = "smollm2-135m"
CORPUS = "shakespeare"
HELDOUT = ("hamlet", "macbeth", "tempest", "twelfth_night")  # conf/data/shakespeare.yaml


# ----------------------------------------------------------------------------------- the shapes


@dataclass(frozen=True)
class Shape:
    """One structured shape: the ``structured.*`` overrides of a run, and which methods run it."""

    name: str
    ffn: float = 0.0  # fraction of FFN neurons removed per block
    heads: float = 0.0  # fraction of query heads removed (in whole KV groups)
    blocks: int = 0  # decoder blocks removed
    attention: int = 0  # attention sublayers removed
    methods: tuple[str, ...] | None = None  # None: every method of --methods

    def overrides(self) -> list[str]:
        return [
            f"structured.ffn={self.ffn}",
            f"structured.heads={self.heads}",
            f"structured.blocks={self.blocks}",
            f"structured.attention={self.attention}",
        ]


# Which methods remove whole blocks (the ``blocks*`` rows). None: every method of --methods (each one's own
# block choice, if its scores decide it); set it to e.g. ("sparsegpt",) when the block choice does not
# depend on the method. ``--block-methods`` overrides it.
BLOCK_METHODS: tuple[str, ...] | None = ("obs",)  # blocks are chosen by influence, whatever the method
BEST = ("obs",)  # the intermediate shapes: the best method only (a 2-core machine runs ~3 min per row)

# The default sweep. Edit freely: a name is only a label (and part of the run folder's name).
SHAPES: list[Shape] = [
    Shape("ffn0.2", ffn=0.2),
    Shape("ffn0.35", ffn=0.35, methods=BEST),
    Shape("ffn0.5", ffn=0.5, methods=BEST),
    Shape("ffn0.2_h0.33", ffn=0.2, heads=0.33, methods=BEST),
    Shape("ffn0.35_h0.33", ffn=0.35, heads=0.33, methods=BEST),
    Shape("ffn0.5_h0.33", ffn=0.5, heads=0.33),
    Shape("blocks2", blocks=2, methods=BLOCK_METHODS),
    Shape("blocks4", blocks=4, methods=BLOCK_METHODS),
    Shape("blocks6", blocks=6, methods=BLOCK_METHODS),
    Shape("attn6", attention=6, methods=("gatenorm", "obs")),  # data-free coupling vs influence
]
QUICK_SHAPES = ("ffn0.5", "ffn0.35_h0.33")
QUICK_METHODS = "magnitude,wanda"


# --------------------------------------------------------------------------------------- helpers


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.update(TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", FLWR_TELEMETRY_ENABLED="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def code(text: str) -> str:
    """``text`` as a Markdown code span, even when it holds backticks."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def resolve_folder(spec: str) -> Path:
    """A bundled model name (``smollm2-135m``) or an existing folder."""
    from fedprune.data.assets import resolve_model_path

    return Path(resolve_model_path(spec)).resolve()


def folder_bytes(folder: Path) -> tuple[int, int]:
    """(bytes of every regular file below ``folder``, bytes of its weight files)."""
    files = [p for p in Path(folder).rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth")]
    return sum(p.stat().st_size for p in files), sum(p.stat().st_size for p in weights)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def last_error_line(text: str, limit: int = 300) -> str:
    """What names a failure: after the last traceback, its exception line and the lines after it (a
    message may span lines); without one, the last non-blank line (e.g. the CLI's logged ERROR)."""
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith("Set the environment variable HYDRA_FULL_ERROR")
    ]
    if not lines:
        return "no output"
    tracebacks = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    found = lines[-1]
    if tracebacks:
        tail = lines[tracebacks[-1] + 1 :]
        heads = [
            i
            for i, line in enumerate(tail)
            if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b", line)
        ]
        if heads:
            found = " / ".join(tail[heads[-1] :])
    return found if len(found) <= limit else found[: limit - 3] + "..."


# ------------------------------------------------------------------------------- the speed worker


def find_load_pruned():
    """fedprune's loader of structurally pruned folders, wherever this checkout has it, or None:
    ``fedprune.load_pruned`` (the public name), else ``fedprune.structured.load.load_pruned``."""
    import fedprune

    try:
        function = fedprune.load_pruned
        return function, "fedprune.load_pruned"
    except (AttributeError, ImportError):
        pass
    try:
        from fedprune.structured.load import load_pruned
    except ImportError:
        return None, None
    return load_pruned, "fedprune.structured.load.load_pruned"


def load_model(path: str, loader: str):
    """The model in eval mode, fp32, KV cache on; and the loader used."""
    import torch

    function, name = find_load_pruned() if loader in ("auto", "fedprune") else (None, None)
    if loader == "fedprune" and function is None:
        raise ImportError("--loader fedprune: this checkout has no fedprune.load_pruned")
    if function is not None:
        model, used = function(path, dtype=torch.float32), name
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
        used = "AutoModelForCausalLM.from_pretrained"
    model.eval()
    model.config.use_cache = True
    return model, used


def count_params(model) -> dict:
    """All parameters (a tied weight once), and those outside the input embeddings and the LM head."""
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in params.values())
    outside = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        outside.add(id(head.weight))
    nonembed = sum(p.numel() for key, p in params.items() if key not in outside)
    return {"params": total, "params_nonembed": nonembed}


def worker_speed(spec: dict) -> dict:
    """Load one model, warm up, time prefill per batch size and greedy decode ``repeats`` times."""
    import torch
    import transformers

    torch.set_num_threads(spec["threads"])
    rss_start = current_rss_mb()
    start = time.perf_counter()
    model, loader = load_model(spec["model"], spec["loader"])
    load_s = time.perf_counter() - start
    rss_loaded = current_rss_mb()
    windows = torch.load(spec["prefill_ids"])  # (max batch, prefill_len)
    prompt = torch.load(spec["prompt_ids"])  # (1, prompt_len)
    new_tokens = spec["new_tokens"]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id

    def prefill(batch: int) -> float:
        ids = windows[:batch]
        start = time.perf_counter()
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - start

    def decode() -> tuple[float, int]:
        start = time.perf_counter()
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            use_cache=True,
            pad_token_id=pad,
        )
        elapsed = time.perf_counter() - start
        return elapsed, int(out.shape[1] - prompt.shape[1])

    times: dict[str, list[float]] = {f"prefill_b{b}": [] for b in spec["batches"]}
    times["decode"] = []
    with torch.inference_mode():
        for b in spec["batches"]:  # warm-up: one of each
            prefill(b)
        _, generated = decode()
        if generated != new_tokens:
            raise RuntimeError(f"generate made {generated} tokens, not {new_tokens}")
        for _ in range(spec["repeats"]):
            for b in spec["batches"]:
                times[f"prefill_b{b}"].append(prefill(b))
            times["decode"].append(decode()[0])
        # the first greedy tokens, to see whether two models still agree
        first = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=16,
            min_new_tokens=16,
            use_cache=True,
            pad_token_id=pad,
        )[0, prompt.shape[1] :].tolist()
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "attn_implementation": model.config._attn_implementation,
        "loader": loader,
        "load_s": load_s,
        "rss_start_mb": rss_start,
        "rss_loaded_mb": rss_loaded,
        "peak_rss_mb": peak_rss_mb(),
        "times": times,
        "first_tokens": first,
        "block_shapes": block_shapes(model),
        "config": {
            k: json.loads(json.dumps(getattr(model.config, k, None), default=str))
            for k in (
                "num_hidden_layers",
                "intermediate_size",
                "num_attention_heads",
                "num_key_value_heads",
                "hidden_size",
            )
        },
        **count_params(model),
    }


def block_shapes(model) -> list[dict] | None:
    """Per decoder block: FFN width and q / k output features (None where a block has no such layer)."""
    try:
        from fedprune.models import find_blocks

        _, blocks = find_blocks(model)
    except Exception:  # noqa: BLE001 - a detail of the report, never a failure
        return None

    def width(block, *path: str) -> int | None:
        module = block
        for name in path:
            module = getattr(module, name, None)
            if module is None:
                return None
        return getattr(module, "out_features", None)

    return [
        {
            "ffn": width(b, "mlp", "up_proj"),
            "q": width(b, "self_attn", "q_proj"),
            "kv": width(b, "self_attn", "k_proj"),
        }
        for b in blocks
    ]


WORKERS = {"speed": worker_speed}


# ------------------------------------------------------------------------------ the speed orchestrator


def run_child(kind: str, spec: dict, work: Path, name: str, threads: int) -> dict:
    """One worker in a fresh process, its output logged to ``work/<name>.log``; raises on failure."""
    spec_path, result_path, log_path = (work / f"{name}.{ext}" for ext in ("spec.json", "result.json", "log"))
    spec_path.write_text(json.dumps(spec))
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        kind,
        "--spec",
        str(spec_path),
        "--result",
        str(result_path),
    ]
    with open(log_path, "w") as log:
        code = subprocess.run(
            command, env=thread_env(threads), stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT)
        ).returncode
    if code != 0:
        text = log_path.read_text()
        raise RuntimeError(f"{name} failed ({code}): {last_error_line(text)}")
    return json.loads(result_path.read_text())


def prepare_ids(work: Path, prefill_len: int, max_batch: int, prompt_len: int) -> dict:
    """The same token ids for every model: the first held-out windows (round-robin over the held-out
    works, as ``fedprune.data.windows.eval_windows`` cuts them) of ``prefill_len`` tokens for prefill,
    and the first ``prompt_len`` tokens of the next window as the decode prompt."""
    import torch

    from fedprune.data.assets import ensure_corpus, ensure_model
    from fedprune.data.corpus import load_works, split_works
    from fedprune.data.windows import eval_windows, tokenize_works
    from fedprune.models import load_tokenizer

    tokenizer = load_tokenizer(ensure_model(DENSE))
    _, held_out = split_works(load_works(ensure_corpus(CORPUS)), list(HELDOUT))
    docs = tokenize_works(tokenizer, held_out)
    windows = eval_windows(docs, max(prefill_len, prompt_len), max_batch + 1)  # (max_batch + 1, len)
    if windows.shape[0] < max_batch + 1:
        raise ValueError(f"only {windows.shape[0]} held-out windows of {prefill_len} tokens")
    prefill = windows[:max_batch, :prefill_len].contiguous()
    prompt = windows[max_batch : max_batch + 1, :prompt_len].contiguous()
    paths = {"prefill_ids": str(work / "prefill.pt"), "prompt_ids": str(work / "prompt.pt")}
    torch.save(prefill, paths["prefill_ids"])
    torch.save(prompt, paths["prompt_ids"])
    return {**paths, "held_out": sorted(held_out)}


def abba(rounds: int) -> list[str]:
    """dense, pruned, pruned, dense, dense, pruned, ... (``rounds`` children of each)."""
    order = []
    for r in range(rounds):
        order += ["dense", "pruned"] if r % 2 == 0 else ["pruned", "dense"]
    return order


def summarize_model(results: list[dict], batches: list[int], prefill_len: int, new_tokens: int) -> dict:
    """Pooled medians over a model's children, tokens/s, max peak RSS."""
    pooled: dict[str, list[float]] = {}
    for result in results:
        for key, values in result["times"].items():
            pooled.setdefault(key, []).extend(values)
    summary = {f"prefill_b{b}_tok_s": b * prefill_len / median(pooled[f"prefill_b{b}"]) for b in batches}
    summary["decode_tok_s"] = new_tokens / median(pooled["decode"])
    summary.update(
        peak_rss_mb=max(r["peak_rss_mb"] for r in results),
        rss_loaded_mb=median([r["rss_loaded_mb"] for r in results]),
        load_s=median([r["load_s"] for r in results]),
        params=results[0]["params"],
        params_nonembed=results[0]["params_nonembed"],
        loader=results[0]["loader"],
        attn_implementation=results[0]["attn_implementation"],
        config=results[0]["config"],
        block_shapes=results[0]["block_shapes"],
        first_tokens=results[0]["first_tokens"],
        median_s={key: median(values) for key, values in pooled.items()},
        times_s=pooled,
    )
    return summary


def measure_speed(dense: Path, pruned: Path, args: argparse.Namespace, work: Path, tag: str = "") -> dict:
    """Both models, ``args.rounds`` children each in ABBA order, the same ids; the speedups."""
    batches = args.batches
    ids = prepare_ids(work, args.prefill_len, max(batches), args.prompt_len)
    spec = {
        **ids,
        "threads": args.threads,
        "repeats": args.repeats,
        "batches": batches,
        "new_tokens": args.new_tokens,
        "loader": args.loader,
    }
    folders = {"dense": dense, "pruned": pruned}
    results: dict[str, list[dict]] = {"dense": [], "pruned": []}
    counts = {"dense": 0, "pruned": 0}
    for which in abba(args.rounds):
        name = f"{tag}{which}{counts[which]}"
        counts[which] += 1
        print(f"    speed {name}: {folders[which]}", flush=True)
        results[which].append(
            run_child("speed", {**spec, "model": str(folders[which])}, work, name, args.threads)
        )
    out = {}
    for which in ("dense", "pruned"):
        out[which] = summarize_model(results[which], batches, args.prefill_len, args.new_tokens)
        out[which]["folder"] = str(folders[which])
        out[which]["folder_bytes"], out[which]["weight_bytes"] = folder_bytes(folders[which])
    keys = [f"prefill_b{b}" for b in batches] + ["decode"]
    speedup = {key: out["dense"]["median_s"][key] / out["pruned"]["median_s"][key] for key in keys}
    by_round = {
        key: [
            median(d["times"][key]) / median(p["times"][key])
            for d, p in zip(results["dense"], results["pruned"], strict=True)
        ]
        for key in keys
    }
    tokens = out["dense"]["first_tokens"]
    agree = next(
        (i for i, (a, b) in enumerate(zip(tokens, out["pruned"]["first_tokens"], strict=False)) if a != b),
        len(tokens),
    )
    return {
        "threads": args.threads,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "order": abba(args.rounds),
        "batches": batches,
        "prefill_len": args.prefill_len,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "held_out": ids["held_out"],
        "dense": out["dense"],
        "pruned": out["pruned"],
        "speedup": speedup,  # dense median time / pruned median time = pruned tokens/s / dense tokens/s
        "speedup_by_round": by_round,
        "params_ratio": out["pruned"]["params"] / out["dense"]["params"],
        "peak_rss_ratio": out["pruned"]["peak_rss_mb"] / out["dense"]["peak_rss_mb"],
        "size_ratio": out["pruned"]["folder_bytes"] / out["dense"]["folder_bytes"],
        "greedy_tokens_agree": agree,  # of the first 16 greedy tokens, how many lead ones are equal
        "torch": results["dense"][0]["torch"],
        "transformers": results["dense"][0]["transformers"],
    }


def shape_line(summary: dict) -> str:
    """Blocks and the range of their FFN / q / kv widths."""
    shapes = summary.get("block_shapes")
    if not shapes:
        return "unknown"

    def span(key: str) -> str:
        values = [b[key] for b in shapes if b[key] is not None]
        if not values:
            return "none"
        low, high = min(values), max(values)
        missing = f" ({len(shapes) - len(values)} without)" if len(values) < len(shapes) else ""
        return (str(low) if low == high else f"{low}–{high}") + missing

    return f"{len(shapes)} blocks, FFN {span('ffn')}, q {span('q')}, kv {span('kv')}"


def speed_report(result: dict, command: str, commit: str) -> str:
    d, p, s = result["dense"], result["pruned"], result["speedup"]

    def rng(key: str) -> str:
        values = result["speedup_by_round"][key]
        return f"{min(values):.2f}–{max(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"

    lines = [
        "# Structured pruning: CPU speed, memory and size, dense vs pruned",
        "",
        f"Made by {code(command)} at commit `{commit}` on {time.strftime('%Y-%m-%d')}: torch {result['torch']}, "
        f"transformers {result['transformers']}, fp32, {d['attn_implementation']} attention, "
        f"{result['threads']} torch thread(s) (and OMP/MKL), loader `{d['loader']}`. Each model in its own "
        f"child process ({result['rounds']} each, order {' '.join(result['order'])}), one warm-up, then "
        f"{result['repeats']} timed runs per child; medians over all of a model's runs. Prefill: one forward "
        f"over batches of {result['prefill_len']}-token held-out windows ({', '.join(result['held_out'])}), KV "
        f"cache on, next-token logits only. Decode: greedy `generate`, {result['new_tokens']} new tokens "
        f"(KV cache) from a {result['prompt_len']}-token prompt, tokens / whole call.",
        "",
        f"- dense: `{d['folder']}`",
        f"- pruned: `{p['folder']}`",
        *([f"- {result['note']}"] if result.get("note") else []),
        f"- shapes: dense {shape_line(d)}; pruned {shape_line(p)}",
        "",
        "| | dense | pruned | pruned / dense (range over rounds) |",
        "| --- | --- | --- | --- |",
    ]
    for b in result["batches"]:
        key = f"prefill_b{b}"
        lines.append(
            f"| prefill tok/s, batch {b} | {d[key + '_tok_s']:.0f} | {p[key + '_tok_s']:.0f} "
            f"| {s[key]:.2f}x ({rng(key)}) |"
        )
    lines += [
        f"| decode tok/s | {d['decode_tok_s']:.1f} | {p['decode_tok_s']:.1f} | {s['decode']:.2f}x ({rng('decode')}) |",
        f"| parameters | {d['params'] / 1e6:.2f} M | {p['params'] / 1e6:.2f} M | {result['params_ratio']:.3f} |",
        f"| parameters outside embeddings / LM head | {d['params_nonembed'] / 1e6:.2f} M "
        f"| {p['params_nonembed'] / 1e6:.2f} M | {p['params_nonembed'] / d['params_nonembed']:.3f} |",
        f"| peak RSS MB | {d['peak_rss_mb']:.0f} | {p['peak_rss_mb']:.0f} | {result['peak_rss_ratio']:.3f} |",
        f"| folder MB (weights) | {d['folder_bytes'] / 1e6:.1f} ({d['weight_bytes'] / 1e6:.1f}) "
        f"| {p['folder_bytes'] / 1e6:.1f} ({p['weight_bytes'] / 1e6:.1f}) | {result['size_ratio']:.3f} |",
        f"| load s | {d['load_s']:.2f} | {p['load_s']:.2f} | |",
        "",
        f"Greedy decode: the first {result['greedy_tokens_agree']} of 16 tokens agree. "
        "Speedup = dense median time / pruned median time (= pruned tokens/s / dense tokens/s); every "
        "run's seconds are in the JSON.",
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ sweep


def cli_command(method: str, shape: Shape, run_dir: Path, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cli.main",  # this checkout's CLI (PYTHONPATH=ROOT), the `fedprune` console script's entry point
        "protocol=centralized",
        f"pruner={method}",
        "pattern=structured",
        *shape.overrides(),
        f"data.calib_windows={args.windows}",
        f"data.seq_len={args.seq_len}",
        f"data.eval_windows={args.eval_windows}",
        f"threads={args.threads}",
        "save_model=true",
        "progress=false",
        f"hydra.run.dir={run_dir}",
    ]


def run_cli(
    method: str, shape: Shape, run_dir: Path, args: argparse.Namespace
) -> tuple[dict | None, str | None]:
    """The metrics of one centralized run (reused when its metrics.json exists), or its error line."""
    metrics = run_dir / "metrics.json"
    if metrics.exists() and (run_dir / "model").is_dir():
        return json.loads(metrics.read_text()), None
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "bench_cli.log"
    env = {**thread_env(args.threads), "HYDRA_FULL_ERROR": "1"}
    command = cli_command(method, shape, run_dir, args)
    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        code = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        return None, f"exit {code}: {last_error_line(log_path.read_text())}"
    if not metrics.exists():
        return None, "exit 0 but no metrics.json"
    if not (run_dir / "model").is_dir():
        return None, "exit 0 but no model/ folder"
    return json.loads(metrics.read_text()), None


def sweep_plan(args: argparse.Namespace) -> list[tuple[str, Shape]]:
    shapes = {s.name: s for s in SHAPES}
    names = args.shapes.split(",") if args.shapes else (list(QUICK_SHAPES) if args.quick else list(shapes))
    unknown = [n for n in names if n not in shapes]
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; the table has {list(shapes)}")
    methods = args.methods.split(",")
    block_methods = args.block_methods.split(",") if args.block_methods else None
    plan = []
    for name in names:
        shape = shapes[name]
        chosen = shape.methods
        if shape.blocks and block_methods is not None:
            chosen = tuple(block_methods)
        for method in chosen if chosen is not None else methods:
            plan.append((method, shape))
    return plan


def sweep_row(method: str, shape: Shape, args: argparse.Namespace, dense: Path) -> dict:
    run_dir = (args.runs / f"{method}_{shape.name}_w{args.windows}_s{args.seq_len}").resolve()
    row = {
        "method": method,
        "shape": shape.name,
        "ffn": shape.ffn,
        "heads": shape.heads,
        "blocks": shape.blocks,
        "attention": shape.attention,
        "run_dir": str(run_dir),
        "error": None,
    }
    print(f"run {method} {shape.name} -> {run_dir}", flush=True)
    start = time.perf_counter()
    metrics, error = run_cli(method, shape, run_dir, args)
    row["cli_s"] = time.perf_counter() - start
    if error is not None:
        print(f"  failed: {error}", flush=True)
        return {**row, "error": error}
    row.update(
        ppl_dense=metrics.get("ppl_dense"),
        ppl_pruned=metrics.get("ppl_pruned"),
        prune_s=metrics.get("prune_s"),
        prune_cpu_s=metrics.get("prune_cpu_s"),
        params_dense=metrics.get("params_dense"),
        params_pruned=metrics.get("params_pruned"),
        metrics_peak_rss_mb=metrics.get("peak_rss_mb"),
    )
    if row["ppl_dense"] and row["ppl_pruned"]:
        row["ppl_ratio"] = row["ppl_pruned"] / row["ppl_dense"]
    if row["ppl_dense"] and row["ppl_pruned"] and metrics.get("params_dense"):
        row["params_ratio"] = row["params_pruned"] / row["params_dense"]
    if args.speed == "none":
        return row
    speed_name = f"speed_t{args.threads}_r{args.repeats}x{args.rounds}.json"
    speed_path = run_dir / speed_name
    same_shape = sorted(args.runs.resolve().glob(f"*_{shape.name}_w{args.windows}_s{args.seq_len}/{speed_name}"))
    if args.speed in ("shape", "cached") and not speed_path.exists() and same_shape:  # the shape decides it
        speed_path.write_text(same_shape[0].read_text())
        row["speed_from"] = same_shape[0].parent.name
    if args.speed == "cached" and not speed_path.exists():
        return row
    try:
        if speed_path.exists():
            speed = json.loads(speed_path.read_text())
        else:
            work = Path(tempfile.mkdtemp(prefix="bench_structured_speed_"))
            try:
                speed = measure_speed(dense, run_dir / "model", args, work)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            speed_path.write_text(json.dumps(speed, indent=2) + "\n")
    except Exception as exc:  # noqa: BLE001 - a row, not a crash
        print(f"  speed failed: {exc}", flush=True)
        return {**row, "error": f"speed: {str(exc).splitlines()[-1] if str(exc) else type(exc).__name__}"}
    if row["params_dense"] is None:  # older metrics: the loaded models' counts
        row["params_dense"], row["params_pruned"] = speed["dense"]["params"], speed["pruned"]["params"]
    row["params_ratio"] = row["params_pruned"] / row["params_dense"]
    row["speedup"] = speed["speedup"]
    row["speed"] = {k: v for k, v in speed.items() if k not in ("dense", "pruned")}
    for which in ("dense", "pruned"):
        s = speed[which]
        row[f"{which}_speed"] = {
            k: s[k]
            for k in s
            if k.endswith("_tok_s")
            or k in ("peak_rss_mb", "folder_bytes", "weight_bytes", "params", "config")
        }
    print(
        f"  ppl {row['ppl_dense']:.3f} -> {row['ppl_pruned']:.3f}, params x{row['params_ratio']:.3f}, "
        f"speedup {json.dumps({k: round(v, 3) for k, v in row['speedup'].items()})}",
        flush=True,
    )
    return row


def sweep_report(rows: list[dict], args: argparse.Namespace, command: str, commit: str) -> str:
    b1, bmax = f"prefill_b{args.batches[0]}", f"prefill_b{args.batches[-1]}"
    lines = [
        "# Structured pruning sweep: perplexity vs CPU speed, SmolLM2-135M, centralized",
        "",
        f"Made by {code(command)} at commit `{commit}` on {time.strftime('%Y-%m-%d')}: each row one "
        f"`fedprune protocol=centralized pattern=structured` run ({args.windows} × {args.seq_len} calibration "
        f"tokens, {args.eval_windows} held-out windows, threads={args.threads}), then the `speed` measurement "
        f"of its `model/` against the dense model ({args.threads} thread(s), {args.rounds} child process(es) "
        f"per model in ABBA order, warm-up + {args.repeats} runs each, medians; prefill on "
        f"{args.prefill_len}-token held-out windows, decode {args.new_tokens} greedy tokens from a "
        f"{args.prompt_len}-token prompt). Speedups are pruned / dense tokens/s measured in the same sitting.",
        "",
        f"| method | shape | ppl dense | ppl pruned | ppl ratio | params pruned / dense | prefill x (b{args.batches[0]}) "
        f"| prefill x (b{args.batches[-1]}) | decode x | peak RSS MB dense / pruned | size MB dense / pruned "
        "| prune CPU s | prune wall s | error |",
        "|" + " --- |" * 14,
    ]

    def f(value, fmt: str) -> str:
        return (
            "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)
        )

    for r in rows:
        if r.get("speedup"):
            d, p = r["dense_speed"], r["pruned_speed"]
            speed = (
                f"| {r['speedup'][b1]:.2f} | {r['speedup'][bmax]:.2f} | {r['speedup']['decode']:.2f} "
                f"| {d['peak_rss_mb']:.0f} / {p['peak_rss_mb']:.0f} "
                f"| {d['folder_bytes'] / 1e6:.0f} / {p['folder_bytes'] / 1e6:.0f} "
            )
        else:
            speed = "| – | – | – | – | – "
        params = (
            f"{r['params_pruned'] / 1e6:.1f} M / {r['params_dense'] / 1e6:.1f} M ({r['params_ratio']:.3f})"
            if r.get("params_ratio")
            else "–"
        )
        error = (r.get("error") or "").replace("|", "\\|")
        lines.append(
            f"| {r['method']} | {r['shape']} | {f(r.get('ppl_dense'), '.3f')} | {f(r.get('ppl_pruned'), '.3f')} "
            f"| {f(r.get('ppl_ratio'), '.3f')} | {params} {speed}| {f(r.get('prune_cpu_s'), '.1f')} "
            f"| {f(r.get('prune_s'), '.1f')} | {error} |"
        )
    lines += [
        "",
        "Shapes: `ffnF` removes a fraction F of the FFN neurons of every block, `_hH` a fraction H of the query "
        "heads (in whole KV groups), `blocksN` N whole decoder blocks (`structured.*` overrides in the JSON).",
    ]
    return "\n".join(lines) + "\n"


def sweep_plot(rows: list[dict], path: Path, key: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get("speedup") and r.get("ppl_ratio")]
    if not done:
        print("no finished row: no plot", flush=True)
        return False
    markers = "osD^vP*Xh<>"
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, method in enumerate(dict.fromkeys(r["method"] for r in done)):
        mine = [r for r in done if r["method"] == method]
        xs, ys = [r["speedup"][key] for r in mine], [r["ppl_ratio"] for r in mine]
        ax.scatter(xs, ys, marker=markers[i % len(markers)], color=f"C{i}", label=method, s=45)
        for r, x, y in zip(mine, xs, ys, strict=True):
            ax.annotate(
                r["shape"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7, color=f"C{i}"
            )
    ax.set_yscale("log")
    ax.axvline(1.0, color="grey", lw=0.6, ls=":")
    ax.set_xlabel(f"measured prefill speedup, pruned / dense ({key.replace('prefill_b', 'batch ')})")
    ax.set_ylabel("perplexity pruned / dense (log)")
    ax.set_title("Structured pruning, SmolLM2-135M: perplexity cost vs CPU speedup")
    ax.grid(True, which="both", lw=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------ slice-ffn


def slice_ffn(source: Path, keep: float, out: Path) -> None:
    """Keep the first ``keep`` fraction of every MLP's intermediate channels (no calibration)."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32, local_files_only=True)
    width = int(round(model.config.intermediate_size * keep))
    with torch.no_grad():
        for layer in model.model.layers:
            mlp = layer.mlp
            for name in ("gate_proj", "up_proj"):
                old = getattr(mlp, name)
                new = nn.Linear(old.in_features, width, bias=old.bias is not None)
                new.weight.copy_(old.weight[:width])
                if old.bias is not None:
                    new.bias.copy_(old.bias[:width])
                setattr(mlp, name, new)
            old = mlp.down_proj
            new = nn.Linear(width, old.out_features, bias=old.bias is not None)
            new.weight.copy_(old.weight[:, :width])
            if old.bias is not None:
                new.bias.copy_(old.bias)
            mlp.down_proj = new
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = width
    model.config.intermediate_size = width
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(source), local_files_only=True).save_pretrained(str(out))
    print(
        f"wrote {out}: intermediate_size {width}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params"
    )


# ------------------------------------------------------------------------------------------ main


def add_speed_options(parser: argparse.ArgumentParser, quick_defaults: bool = False) -> None:
    parser.add_argument("--threads", type=int, default=1, help="torch threads (and OMP/MKL) of every child")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs per child (default 5; --quick 2)"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="children per model, ABBA order (default 2; --quick 1)"
    )
    parser.add_argument("--batches", default="1,4", help="prefill batch sizes (windows per forward)")
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--loader",
        choices=("auto", "fedprune", "hf"),
        default="auto",
        help="auto: fedprune.load_pruned when this checkout has it, else AutoModelForCausalLM",
    )
    quick = "repeats 2, rounds 1"
    if quick_defaults:
        quick += f", 4 calibration and eval windows, shapes {','.join(QUICK_SHAPES)}, methods {QUICK_METHODS}"
    parser.add_argument("--quick", action="store_true", help=quick)


def finish_speed_options(args: argparse.Namespace) -> None:
    args.batches = [int(b) for b in str(args.batches).split(",")]
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.rounds is None:
        args.rounds = 1 if args.quick else 2


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":  # a child process
        worker = argparse.ArgumentParser()
        worker.add_argument("--worker", choices=sorted(WORKERS))
        worker.add_argument("--spec", type=Path)
        worker.add_argument("--result", type=Path)
        w = worker.parse_args(argv)
        result = WORKERS[w.worker](json.loads(w.spec.read_text()))
        w.result.write_text(json.dumps(result, indent=2))
        return
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    speed = sub.add_parser(
        "speed", help="CPU prefill / decode speed, memory, size: a dense vs a pruned folder"
    )
    speed.add_argument("--dense", default=DENSE, help="dense model: a folder or a bundled name")
    speed.add_argument("--pruned", required=True, help="pruned model folder (e.g. OUT/model)")
    speed.add_argument("--out", type=Path, default=Path("experiments/results/bench_structured_speed"))
    speed.add_argument("--keep-work", action="store_true", help="keep the children's logs and specs")
    speed.add_argument(
        "--note", default="", help="a line for the report (e.g. how the pruned folder was made)"
    )
    add_speed_options(speed)

    sw = sub.add_parser("sweep", help="fedprune runs per method x shape, then speed of each against dense")
    sw.add_argument("--methods", default=None, help="pruners (default magnitude,wanda,variance,sparsegpt,obs)")
    sw.add_argument(
        "--shapes", default=None, help=f"names from the SHAPES table: {','.join(s.name for s in SHAPES)}"
    )
    sw.add_argument(
        "--block-methods", default=None, help="methods for the blocks* shapes (default: the table's)"
    )
    sw.add_argument(
        "--speed",
        choices=("all", "shape", "cached", "none"),
        default="all",
        help="measure speed for every run, once per shape (the other methods' rows reuse it: same widths, "
        "at most some biases more), only report speeds measured before (cached), or not at all",
    )
    sw.add_argument("--windows", type=int, default=None, help="calibration windows (default 128; --quick 4)")
    sw.add_argument("--seq-len", type=int, default=512)
    sw.add_argument("--eval-windows", type=int, default=None, help="held-out windows (default 16; --quick 4)")
    sw.add_argument("--dense", default=DENSE, help="dense model for the speed comparison")
    sw.add_argument(
        "--runs", type=Path, default=None, help="run folders (default multirun/bench_structured[_quick])"
    )
    sw.add_argument(
        "--out", type=Path, default=None, help="default experiments/results/bench_structured[_quick]"
    )
    add_speed_options(sw, quick_defaults=True)

    sl = sub.add_parser("slice-ffn", help="a hand-made smaller model: the first channels of every MLP")
    sl.add_argument("--model", default=DENSE)
    sl.add_argument("--keep", type=float, default=0.5)
    sl.add_argument("--out", type=Path, required=True)

    args = parser.parse_args(argv)
    command = "python experiments/bench_structured.py " + shlex.join(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.command == "slice-ffn":
        slice_ffn(resolve_folder(args.model), args.keep, args.out)
        return

    finish_speed_options(args)
    commit = git_commit()
    if args.command == "speed":
        work = Path(tempfile.mkdtemp(prefix="bench_structured_speed_"))
        try:
            result = measure_speed(resolve_folder(args.dense), resolve_folder(args.pruned), args, work)
        finally:
            if args.keep_work:
                print(f"children's logs kept in {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
        result["note"] = args.note
        report = speed_report(result, command, commit)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(report)
        args.out.with_suffix(".json").write_text(
            json.dumps({"command": command, "commit": commit, **result}, indent=2) + "\n"
        )
        print(report)
        return

    # sweep
    args.methods = args.methods or (QUICK_METHODS if args.quick else "magnitude,wanda,variance,sparsegpt,obs")
    args.windows = args.windows or (4 if args.quick else 128)
    args.eval_windows = args.eval_windows or (4 if args.quick else 16)
    suffix = "_quick" if args.quick else ""
    args.runs = args.runs or Path(f"multirun/bench_structured{suffix}")
    out = args.out or Path(f"experiments/results/bench_structured{suffix}")
    if not args.runs.is_absolute():
        args.runs = ROOT / args.runs
    dense = resolve_folder(args.dense)
    rows = [sweep_row(method, shape, args, dense) for method, shape in sweep_plan(args)]
    report = sweep_report(rows, args, command, commit)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(report)
    summary = {
        "command": command,
        "commit": commit,
        "windows": args.windows,
        "seq_len": args.seq_len,
        "eval_windows": args.eval_windows,
        "threads": args.threads,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "dense": str(dense),
        "shapes": {s.name: s.overrides() for s in SHAPES},
        "rows": rows,
    }
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    if sweep_plot(rows, out.with_suffix(".png"), f"prefill_b{args.batches[0]}"):
        print(f"plot {out.with_suffix('.png')}")
    print(report)


if __name__ == "__main__":
    main()
