"""Tokenizing works, random calibration windows and fixed evaluation windows on tiny tensors."""

from __future__ import annotations

import pytest
import torch

from fedprune.data.windows import eval_windows, sample_windows, tokenize_works


class CharTokenizer:
    """Real (if tiny) tokenizer: one id per character, a BOS id 0 only with special tokens."""

    def __call__(self, text, add_special_tokens=True, return_attention_mask=True):
        ids = [ord(c) for c in text]
        return {"input_ids": ([0] + ids) if add_special_tokens else ids}


def arange_docs() -> dict[str, torch.Tensor]:
    # ids encode (doc, position): doc "a" = 100.., "b" = 200.., "c" = 300..
    return {
        "b": torch.arange(200, 207),  # 7 tokens
        "a": torch.arange(100, 110),  # 10 tokens
        "c": torch.arange(300, 302),  # 2 tokens: too short for seq_len 3
    }


def test_tokenize_works_no_special_tokens_sorted_int64():
    docs = tokenize_works(CharTokenizer(), {"b": "hi", "a": "AB"})
    assert list(docs) == ["a", "b"]
    assert docs["a"].dtype == torch.int64
    assert docs["a"].tolist() == [65, 66]
    assert docs["b"].tolist() == [104, 105]


def test_sample_windows_shape_and_contiguity():
    windows = sample_windows(arange_docs(), num_windows=50, seq_len=3, seed=0)
    assert windows.shape == (50, 3)
    assert windows.dtype == torch.int64
    # every window is 3 consecutive ids of one document, never from the too-short "c"
    assert torch.equal(windows[:, 1] - windows[:, 0], torch.ones(50, dtype=torch.int64))
    assert torch.equal(windows[:, 2] - windows[:, 1], torch.ones(50, dtype=torch.int64))
    starts = windows[:, 0]
    in_a = (starts >= 100) & (starts <= 107)  # last valid start 107 (10 - 3)
    in_b = (starts >= 200) & (starts <= 204)  # last valid start 204 (7 - 3)
    assert bool((in_a | in_b).all())


def test_sample_windows_deterministic_per_seed_and_order_free():
    docs = arange_docs()
    reordered = {name: docs[name] for name in ("c", "a", "b")}
    first = sample_windows(docs, 20, 3, seed=7)
    assert torch.equal(first, sample_windows(reordered, 20, 3, seed=7))
    assert not torch.equal(first, sample_windows(docs, 20, 3, seed=8))


def test_sample_windows_covers_every_offset_uniformly():
    # 8 valid starts in "a" + 5 in "b" = 13 equally likely windows
    windows = sample_windows(arange_docs(), num_windows=13000, seq_len=3, seed=1)
    starts, counts = windows[:, 0].unique(return_counts=True)
    assert starts.tolist() == [*range(100, 108), *range(200, 205)]
    assert counts.min() > 800 and counts.max() < 1200  # expectation 1000


def test_sample_windows_does_not_use_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    sample_windows(arange_docs(), 5, 3, seed=3)
    assert torch.equal(torch.rand(3), expected)


def test_sample_windows_exact_length_doc_is_usable():
    windows = sample_windows({"x": torch.arange(4)}, 3, 4, seed=0)
    assert windows.tolist() == [[0, 1, 2, 3]] * 3


def test_sample_windows_no_long_enough_doc():
    with pytest.raises(ValueError, match="no document has 11 tokens"):
        sample_windows(arange_docs(), 4, 11, seed=0)
    with pytest.raises(ValueError):
        sample_windows(arange_docs(), 0, 3, seed=0)


def test_eval_windows_round_robin_non_overlapping_tail_dropped():
    windows = eval_windows(arange_docs(), seq_len=3)
    # a: [100..102] [103..105] [106..108] (109 dropped); b: [200..202] [203..205] (206 dropped)
    assert windows.tolist() == [
        [100, 101, 102],
        [200, 201, 202],
        [103, 104, 105],
        [203, 204, 205],
        [106, 107, 108],
    ]
    assert windows.unique().numel() == windows.numel()  # non-overlapping


def test_eval_windows_cap_takes_first_round_robin():
    windows = eval_windows(arange_docs(), seq_len=3, max_windows=3)
    assert windows[:, 0].tolist() == [100, 200, 103]
    assert eval_windows(arange_docs(), seq_len=3, max_windows=99).shape == (5, 3)


def test_eval_windows_errors():
    with pytest.raises(ValueError, match="11 tokens"):
        eval_windows(arange_docs(), seq_len=11)
    with pytest.raises(ValueError):
        eval_windows(arange_docs(), seq_len=3, max_windows=0)
