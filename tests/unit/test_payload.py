import numpy as np
import pytest
import torch

from fedprune.payload import (
    PayloadError,
    decode_masks,
    decode_stats,
    decode_weights,
    encode_masks,
    encode_stats,
    encode_weights,
    payload_bytes,
    symmetric_from_triu,
    triu_of,
)
from fedprune.stats import batch_stats


def test_triu_hand_checked():
    m = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 5.0], [3.0, 5.0, 6.0]])
    assert triu_of(m).tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert torch.equal(symmetric_from_triu(triu_of(m), 3), m)


def _block_stats(kind):
    x = torch.randn(2, 5, 4)
    y = torch.randn(2, 5, 3)
    shared = batch_stats(kind, x)
    return {"q": shared, "k": shared, "v": shared, "o": batch_stats(kind, y)}


@pytest.mark.parametrize("kind", ["sq_norm", "hessian"])
def test_stats_round_trip_with_dedup(kind):
    stats = _block_stats(kind)
    arrays = encode_stats(stats)
    assert arrays["index"].tolist() == [0, 1, 0, 0]  # k, o, q, v: q/k/v share one entry
    assert arrays["count"].tolist() == [10, 10]
    decoded = decode_stats(arrays, kind, {"q": 4, "k": 4, "v": 4, "o": 3}, max_count=10)
    for name, s in stats.items():
        assert decoded[name].count == s.count
        assert torch.equal(decoded[name].total, s.total)
    if kind == "hessian":
        assert arrays["total.0"].shape == (10,)  # 4·5/2


@pytest.mark.parametrize(
    "mutate,reason",
    [
        (lambda a: a.update({"total.0": a["total.0"].astype(np.float32)}), "dtype"),
        (lambda a: a.update({"total.0": a["total.0"][:-1]}), "shape"),
        (lambda a: a["total.1"].__setitem__(0, np.nan), "NaN"),
        (lambda a: a.update({"count": np.array([10, 11])}), "outside"),
        (lambda a: a.update({"count": np.array([0, 10])}), "outside"),
        (lambda a: a.pop("index"), "missing"),
        (lambda a: a.update({"index": np.array([0, 5, 0, 0])}), "outside"),
    ],
)
def test_malformed_stats_rejected(mutate, reason):
    arrays = encode_stats(_block_stats("sq_norm"))
    mutate(arrays)
    with pytest.raises(PayloadError, match=reason):
        decode_stats(arrays, "sq_norm", {"q": 4, "k": 4, "v": 4, "o": 3}, max_count=10)


def test_masks_are_one_bit_per_weight():
    masks = {"a": torch.rand(8, 16) > 0.5, "b": torch.rand(3, 5) > 0.5}
    arrays = encode_masks(masks)
    assert payload_bytes(arrays) == 8 * 16 // 8 + 2
    decoded = decode_masks(arrays, {"a": (8, 16), "b": (3, 5)})
    assert all(torch.equal(decoded[k], masks[k]) for k in masks)
    with pytest.raises(PayloadError):
        decode_masks(arrays, {"a": (8, 17), "b": (3, 5)})


def test_weights_round_trip_and_validation():
    weights = {"a": torch.randn(2, 3)}
    assert torch.equal(decode_weights(encode_weights(weights), {"a": (2, 3)})["a"], weights["a"])
    bad = {"weight.a": np.full((2, 3), np.inf, dtype=np.float32)}
    with pytest.raises(PayloadError, match="NaN or Inf"):
        decode_weights(bad, {"a": (2, 3)})
