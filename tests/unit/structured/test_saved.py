"""A structurally pruned model saved and loaded back: ``from_pretrained`` where the config can state it,
``fedprune.load_pruned`` always; both give the pruned model's logits."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from fedprune import load_pruned
from fedprune.masks import parse_pattern
from fedprune.outputs import save_model_atomic
from fedprune.pruners import get_pruner
from fedprune.sequential import prune_model_
from fedprune.structured.decide import Structure
from fedprune.structured.saved import STRUCTURE_FILE, config_updates, finalize_config_, structure_record
from tests.tiny_models import random_windows, tiny_model


def _pruned_and_saved(arch, method, ffn, heads, folder):
    model = tiny_model(arch)
    structure = Structure.for_model(model, ffn, heads)
    prune_model_(
        model,
        random_windows(4, 12),
        get_pruner(method),
        0.0,
        parse_pattern("structured"),
        2,
        progress=False,
        structure=structure,
    )
    with torch.no_grad():
        before = model(input_ids=random_windows(2, 10, seed=3)).logits
    loadable = finalize_config_(model, structure.family, structure.shape)
    record = {STRUCTURE_FILE: structure_record(model, loadable)}
    save_model_atomic(model, None, folder, record, config_updates(model, loadable))
    with torch.no_grad():  # zero biases added for a config flag change nothing
        torch.testing.assert_close(model(input_ids=random_windows(2, 10, seed=3)).logits, before)
    return model, loadable, before


@pytest.mark.parametrize(
    ("arch", "method", "ffn", "heads", "loadable"),
    [
        ("llama", "wanda", 0.5, 0.5, True),
        ("llama", "variance", 0.25, 0.5, True),  # biases: mlp_bias and attention_bias set
        ("qwen2", "wanda", 0.5, 0.5, True),
        ("qwen2", "variance", 0.5, 0.0, False),  # Qwen2's config cannot give the FFN a bias
        ("opt", "wanda", 0.5, 0.0, True),
        ("opt", "wanda", 0.5, 0.5, False),  # OPT derives head size from hidden / heads
        ("gpt2", "variance", 0.5, 0.0, True),
        ("gpt2", "magnitude", 0.25, 0.5, False),
    ],
)
def test_saved_model_loads_with_the_pruned_logits(arch, method, ffn, heads, loadable, tmp_path):
    model, got_loadable, before = _pruned_and_saved(arch, method, ffn, heads, tmp_path / "m")
    assert got_loadable is loadable
    ids = random_windows(2, 10, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(tmp_path / "m")(input_ids=ids).logits, before)
        if loadable:
            plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
            torch.testing.assert_close(plain(input_ids=ids).logits, before)
    if not loadable:  # refused loudly, naming the loader (never silently dropped or random tensors)
        with pytest.raises(ValueError, match="fedprune.load_pruned"):
            AutoModelForCausalLM.from_pretrained(tmp_path / "m")


def test_generate_runs_on_the_loaded_model(tmp_path):
    _pruned_and_saved("llama", "wanda", 0.5, 0.5, tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    out = model.generate(
        random_windows(1, 5), max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0
    )
    assert out.shape == (1, 11)
