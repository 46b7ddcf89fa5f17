"""CPU inference speed of a causal LM in this process (``speed.measure=true``): prefill and greedy decode
tokens per second, each the median of ``repeats`` timed runs after one warm-up.

Prefill: one forward over a ``(1, prefill_len)`` window with the KV cache on and next-token logits only,
as ``generate`` prefills. Decode: ``generate(do_sample=False)`` of exactly ``new_tokens`` tokens from a
``(1, prompt_len)`` prompt, tokens / the whole call. Wall-clock seconds (``time.perf_counter``), with
the process's torch threads: on a shared machine the figures move; compare dense and pruned measured in
the same run, and use ``experiments/bench_structured.py`` (separate processes, interleaved rounds) for
tables.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeedFigures:
    """Median tokens per second of one model."""

    prefill_tok_s: float
    decode_tok_s: float

    def as_dict(self) -> dict[str, float]:
        return {"prefill_tok_s": self.prefill_tok_s, "decode_tok_s": self.decode_tok_s}


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls of ``run`` after one untimed warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def prefill_tokens_per_s(model: nn.Module, window: torch.Tensor, repeats: int) -> float:
    """Prefill tokens/s over ``window`` ``(1, tokens)``."""

    def run() -> None:
        model(input_ids=window, use_cache=True, logits_to_keep=1)

    return window.shape[1] / median_seconds(run, repeats)


@torch.no_grad()
def decode_tokens_per_s(model: nn.Module, prompt: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """Greedy decode tokens/s: exactly ``new_tokens`` generated from ``prompt`` ``(1, tokens)``."""
    attention_mask = torch.ones_like(prompt)
    pad = getattr(model.config, "eos_token_id", None)
    pad = pad[0] if isinstance(pad, list) else pad

    def run() -> None:
        out = model.generate(
            input_ids=prompt,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=pad,
        )
        if out.shape[1] != prompt.shape[1] + new_tokens:
            raise RuntimeError(f"generate gave {out.shape[1] - prompt.shape[1]} tokens, not {new_tokens}")

    return new_tokens / median_seconds(run, repeats)


def measure_speed(
    model: nn.Module, eval_ids: torch.Tensor, prefill_len: int, prompt_len: int, new_tokens: int, repeats: int
) -> SpeedFigures:
    """Prefill and decode speed of ``model`` on the first held-out window ``eval_ids[0]``."""
    if eval_ids.shape[1] < max(prefill_len, prompt_len):
        raise ValueError(
            f"held-out windows have {eval_ids.shape[1]} tokens: too few for prefill {prefill_len} / "
            f"prompt {prompt_len}"
        )
    was_training = model.training
    model.eval()
    try:
        prefill = prefill_tokens_per_s(model, eval_ids[:1, :prefill_len], repeats)
        decode = decode_tokens_per_s(model, eval_ids[:1, :prompt_len], new_tokens, repeats)
    finally:
        model.train(was_training)
    logger.info("speed: prefill %.1f tok/s, decode %.2f tok/s", prefill, decode)
    return SpeedFigures(prefill_tok_s=prefill, decode_tok_s=decode)


def speed_metrics(dense: SpeedFigures, pruned: SpeedFigures, settings: dict) -> dict:
    """metrics.json's ``speed``: both models' figures, pruned / dense speed-ups, and how they were taken."""
    return {
        "dense": dense.as_dict(),
        "pruned": pruned.as_dict(),
        "prefill_speedup": pruned.prefill_tok_s / dense.prefill_tok_s,
        "decode_speedup": pruned.decode_tok_s / dense.decode_tok_s,
        "threads": torch.get_num_threads(),
        **settings,
    }
