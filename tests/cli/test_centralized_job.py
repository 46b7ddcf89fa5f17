import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from cli.main import run, validate
from fedprune.config import ConfigError
from fedprune.data.corpus import load_works, split_works
from fedprune.data.windows import eval_windows, tokenize_works
from fedprune.eval import perplexity
from fedprune.models import load_tokenizer

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("pruner,pattern", [("wanda", "unstructured"), ("sparsegpt", "2:4")])
def test_run_writes_metrics_sparsity_and_loadable_model(make_cfg, tiny_assets, tmp_path, pruner, pattern):
    cfg = make_cfg(f"pruner={pruner}", f"pattern={pattern}")
    metrics = run(cfg, tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    for key in (
        "model",
        "pruner",
        "pattern",
        "sparsity",
        "sparsity_actual",
        "ppl_dense",
        "ppl_pruned",
        "calib_tokens",
        "eval_tokens",
        "wall_s",
        "peak_rss_mb",
        "prune_s",
        "prune_cpu_s",
    ):
        assert key in saved
    # CPU time ticks in 10 ms steps: a tiny model's pruning may read 0 (tests/unit/test_timing.py checks it)
    assert saved["prune_cpu_s"] >= 0 and 0 < saved["prune_s"] < saved["wall_s"]
    assert saved["sparsity_actual"] == pytest.approx(0.5)
    assert saved["calib_tokens"] == 8 * 16 and saved["eval_tokens"] == 6 * 15
    layers = json.loads((tmp_path / "sparsity.json").read_text())
    assert len(layers) == 2 * 7 and all(v == pytest.approx(0.5) for v in layers.values())
    # the saved folder loads with transformers and gives the same perplexity
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    tokenizer = load_tokenizer(tmp_path / "model")
    _, held = split_works(load_works(tiny_assets["corpus"]), ["hamlet", "macbeth"])
    ids = eval_windows(tokenize_works(tokenizer, held), 16, 6)
    assert perplexity(model, ids).value == pytest.approx(saved["ppl_pruned"], rel=1e-5)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary leftovers


@pytest.mark.parametrize(
    "override,key",
    [
        ("pruner.name=nope", "pruner.name"),
        ("sparsity=1.0", "sparsity"),
        ("sparsity=-0.1", "sparsity"),
        ("pattern=4:4", "pattern"),
        ("pattern=5:4", "pattern"),
        ("model.path=/does/not/exist", "model.path"),
        ("data.path=/does/not/exist", "data.path"),
        ("speed.measure=true speed.repeats=0", "speed.repeats"),
        ("speed.measure=true speed.prompt_len=17", "speed.prompt_len"),
        ("speed.measure=true speed.prefill_len=32", "speed.prefill_len"),
        ("speed.measure=true speed.prompt_len=5 model.offload=true", "speed.measure"),
    ],
)
def test_bad_config_names_the_key(make_cfg, override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        validate(make_cfg(*override.split()))


def test_cli_bad_config_fails_before_loading(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "pruner=wanda",
            "sparsity=1.5",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "'sparsity'" in result.stderr + result.stdout
    assert not (tmp_path / "metrics.json").exists()


def test_pruned_weights_really_zero(make_cfg, tmp_path):
    run(make_cfg("pruner=magnitude", "save_model=true"), tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    w = model.model.layers[0].mlp.down_proj.weight
    assert (w == 0).float().mean().item() == pytest.approx(0.5)
    assert torch.isfinite(w).all()


def test_local_reports_every_site(make_cfg, tmp_path):
    metrics = run(make_cfg("protocol=local", "federation.num_clients=2", "save_model=false"), tmp_path)
    assert len(metrics["ppl_per_client"]) == 2
    assert metrics["ppl_pruned"] == pytest.approx(sum(metrics["ppl_per_client"]) / 2)
    assert metrics["calib_tokens"] == 8 * 16


@pytest.mark.parametrize(
    "shape",
    [
        ["pattern=unstructured"],
        ["pattern=structured", "structured.ffn=0.5", "structured.heads=0.5", "structured.attention=1"],
    ],
)
def test_speed_measure_reports_dense_and_pruned_figures(make_cfg, tmp_path, shape):
    speed = ["speed.measure=true", "speed.repeats=1", "speed.prompt_len=5", "speed.new_tokens=3"]
    metrics = run(make_cfg(*shape, *speed), tmp_path)
    figures = json.loads((tmp_path / "metrics.json").read_text())["speed"]
    assert figures == metrics["speed"]
    assert figures["prefill_len"] == 16 and figures["prompt_len"] == 5 and figures["new_tokens"] == 3
    for model in ("dense", "pruned"):
        assert figures[model]["prefill_tok_s"] > 0 and figures[model]["decode_tok_s"] > 0
    assert figures["decode_speedup"] == pytest.approx(
        figures["pruned"]["decode_tok_s"] / figures["dense"]["decode_tok_s"]
    )
    assert "speed" not in run(make_cfg(*shape), tmp_path / "off")  # off by default
