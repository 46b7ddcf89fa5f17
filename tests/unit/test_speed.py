"""fedprune.speed: the median of timed runs after a warm-up (a scripted clock), exact token counts, and
real figures from a tiny model's prefill and greedy decode."""

import math
from types import SimpleNamespace

import pytest
import torch

from fedprune import speed
from fedprune.speed import SpeedFigures, decode_tokens_per_s, measure_speed, median_seconds, speed_metrics
from tests.tiny_models import random_windows, tiny_model


def test_median_of_the_timed_runs_after_one_untimed_warm_up(monkeypatch):
    calls = []
    # perf_counter readings: start/end of each timed run -> durations 3, 1, 2 (median 2)
    readings = iter([10.0, 13.0, 20.0, 21.0, 30.0, 32.0])
    monkeypatch.setattr(speed.time, "perf_counter", lambda: next(readings))
    assert median_seconds(lambda: calls.append(1), repeats=3) == 2.0
    assert len(calls) == 4  # warm-up + 3 timed


def test_decode_refuses_a_generate_that_stops_early():
    class Stub(torch.nn.Module):
        config = SimpleNamespace(eos_token_id=[0, 1])

        def generate(self, input_ids, **kwargs):
            assert kwargs["min_new_tokens"] == kwargs["max_new_tokens"] == 5 and not kwargs["do_sample"]
            return torch.cat([input_ids, input_ids[:, :2]], dim=1)  # 2 new tokens, not 5

    with pytest.raises(RuntimeError, match="2 tokens, not 5"):
        decode_tokens_per_s(Stub(), torch.zeros(1, 4, dtype=torch.long), 5, 1)


def test_a_tiny_model_generates_exactly_the_tokens_asked_and_stays_in_its_mode():
    model = tiny_model("llama")
    model.train()
    ids = random_windows(2, 16)
    figures = measure_speed(model, ids, prefill_len=12, prompt_len=6, new_tokens=7, repeats=2)
    assert model.training  # restored
    assert all(math.isfinite(v) and v > 0 for v in figures.as_dict().values())
    with pytest.raises(ValueError, match="too few"):
        measure_speed(model, ids, prefill_len=17, prompt_len=6, new_tokens=2, repeats=1)


def test_metrics_report_pruned_over_dense_and_the_settings():
    out = speed_metrics(SpeedFigures(100.0, 10.0), SpeedFigures(150.0, 12.0), {"repeats": 3})
    assert out["prefill_speedup"] == 1.5 and out["decode_speedup"] == pytest.approx(1.2)
    assert out["dense"] == {"prefill_tok_s": 100.0, "decode_tok_s": 10.0} and out["repeats"] == 3
