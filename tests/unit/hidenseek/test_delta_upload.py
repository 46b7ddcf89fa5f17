"""The ``score_delta`` upload as one uint8 array: byte layout, round trip, rejection of malformed arrays."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord
from torch import nn

from fedprune.hidenseek.aggregate import (
    decoded_change,
    delta_scale,
    delta_upload_size,
    pack_delta_upload,
    stochastic_signs,
    top_changes,
    top_count,
    unpack_delta_upload,
)
from fedprune.hidenseek.server import HideNseekJob, validate_reply
from fedprune.hidenseek.site import HideNseekTask
from fedprune.protocols.federation import Reply
from fedprune.protocols.messages import MessageError

# 5 kept weights, 2 exact top changes: -2.0 at 1 and 0.5 at 3, clip scale 0.5
SIGNS = torch.tensor([1, -1, 1, 1, -1], dtype=torch.int8)
INDEX = torch.tensor([1, 3])
VALUES = torch.tensor([-2.0, 0.5], dtype=torch.float16)
# signs: bits 10110 + 3 zero padding bits = 0b10110000 = 176
# scale 0.5 = float32 0x3F000000 -> little-endian 00 00 00 3F
# indices 1, 3 as uint16 LE -> 01 00 03 00; float16 -2.0 = 0xC000 -> 00 C0, 0.5 = 0x3800 -> 00 38
BY_HAND = [176, 0, 0, 0, 0x3F, 1, 0, 3, 0, 0, 0xC0, 0, 0x38]


def _by_hand() -> np.ndarray:
    return np.array(BY_HAND, dtype=np.uint8)


def test_upload_size_is_signs_scale_and_four_bytes_per_top_change():
    assert delta_upload_size(5, 2) == 1 + 4 + 8
    assert delta_upload_size(8, 0) == 1 + 4 and delta_upload_size(9, 0) == 2 + 4
    # the digits MLP at density 0.5 keeps 12,928 weights; 2.5 % of them are sent exactly
    assert top_count(12_928, 0.025) == 323
    assert delta_upload_size(12_928, 323) == 1_616 + 4 + 1_292
    with pytest.raises(ValueError):
        delta_upload_size(5, 6)


def test_exact_byte_layout_of_a_small_case():
    packed = pack_delta_upload(SIGNS, 0.5, INDEX, VALUES)
    assert packed.dtype == np.uint8 and packed.tolist() == BY_HAND
    signs, scale, top = unpack_delta_upload(packed, 5, 2)
    assert signs.tolist() == SIGNS.tolist() and signs.dtype == torch.int8
    assert scale == 0.5
    assert top is not None and top[0].tolist() == [1, 3] and top[1].tolist() == [-2.0, 0.5]
    # the server reads scale * sign, with the exact change at the top indices
    assert decoded_change(signs, scale, *top).tolist() == [0.5, -2.0, 0.5, 0.5, -0.5]


def test_no_top_changes_is_signs_and_scale_only():
    empty = torch.zeros(0, dtype=torch.int64)
    packed = pack_delta_upload(SIGNS, 0.5, empty, torch.zeros(0, dtype=torch.float16))
    assert packed.tolist() == BY_HAND[:5]
    signs, scale, top = unpack_delta_upload(packed, 5, 0)
    assert signs.tolist() == SIGNS.tolist() and scale == 0.5 and top is None


def test_round_trip_of_a_site_upload():
    generator = torch.Generator().manual_seed(3)
    num_kept = 1_001  # not a multiple of 8: 7 padding bits
    delta = torch.randn(num_kept, generator=generator) ** 3  # heavy-tailed, like score changes
    count = top_count(num_kept, 0.025)
    index, values = top_changes(delta, count)
    scale = delta_scale(delta, 0.9)
    signs = stochastic_signs(delta, scale, generator)
    packed = pack_delta_upload(signs, scale, index, values)
    assert packed.shape == (delta_upload_size(num_kept, count),) == (126 + 4 + 4 * 25,)
    # through a Flower Array and back, as on the wire
    wire = Array(packed).numpy()
    back_signs, back_scale, top = unpack_delta_upload(wire, num_kept, count)
    assert torch.equal(back_signs, signs)
    assert back_scale == float(np.float32(scale))
    assert top is not None and torch.equal(top[0], index) and torch.equal(top[1], values.float())


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (_by_hand()[:-1], "uint8 \\(13,\\)"),  # one byte short
        (np.append(_by_hand(), 0).astype(np.uint8), "uint8 \\(13,\\)"),  # one byte long
        (_by_hand().astype(np.int8), "uint8"),  # wrong dtype
        (_by_hand().reshape(1, -1), "uint8"),  # not flat
        (np.array([177, *BY_HAND[1:]], dtype=np.uint8), "padding"),  # a bit after the last sign
        (np.array([176, 0, 0, 0xC0, 0x7F, *BY_HAND[5:]], dtype=np.uint8), "scale"),  # NaN scale
        (np.array([176, 0, 0, 0, 0xBF, *BY_HAND[5:]], dtype=np.uint8), "scale"),  # scale -0.5
        (np.array([*BY_HAND[:5], 5, 0, *BY_HAND[7:]], dtype=np.uint8), "increasing"),  # 5, 3: not increasing
        (np.array([*BY_HAND[:7], 5, 0, *BY_HAND[9:]], dtype=np.uint8), "< 5"),  # index 5 of 5 kept
        (np.array([*BY_HAND[:11], 0x00, 0x7C], dtype=np.uint8), "NaN or Inf"),  # float16 +Inf
    ],
)
def test_malformed_upload_is_rejected(array, match):
    with pytest.raises(ValueError, match=match):
        unpack_delta_upload(array, 5, 2)


def test_layout_depends_on_the_public_counts():
    with pytest.raises(ValueError, match="uint8 \\(9,\\)"):
        unpack_delta_upload(_by_hand(), 5, 1)  # the server expects 1 top change, the site sent 2
    with pytest.raises(ValueError, match="uint8 \\(14,\\)"):
        unpack_delta_upload(_by_hand(), 9, 2)  # 9 kept weights need 2 sign bytes


def test_pack_rejects_what_cannot_be_sent():
    with pytest.raises(ValueError, match="scale"):
        pack_delta_upload(SIGNS, float("nan"), INDEX, VALUES)
    with pytest.raises(ValueError, match="scale"), np.errstate(over="ignore"):
        pack_delta_upload(SIGNS, 1e39, INDEX, VALUES)  # overflows float32
    with pytest.raises(ValueError, match="float16"):
        pack_delta_upload(SIGNS, 0.5, INDEX, VALUES.float())
    with pytest.raises(ValueError, match="-1 or"):
        pack_delta_upload(torch.zeros(5, dtype=torch.int8), 0.5, INDEX, VALUES)


def _job(delta_topk: float) -> HideNseekJob:
    return HideNseekJob(
        variant="sign_supermask",
        aggregation="score_delta",
        base_model=nn.Linear(1, 1),
        masks={},
        rounds=1,
        init_scale=0.1,
        task=HideNseekTask(
            **{
                "variant": "sign_supermask",
                "aggregation": "score_delta",
                "arch": "mlp",
                "init": "kaiming_normal",
            },
            **dict.fromkeys(
                ("hidden", "model_seed", "data_seed", "seed", "min_size", "epochs", "batch_size"), 1
            ),
            **dict.fromkeys(
                ("test_fraction", "alpha", "lr", "momentum", "init_scale", "delta_clip_quantile"), 0.5
            ),
            optimizer="sgd",
            delta_topk=delta_topk,
        ),
        x_test=torch.zeros(1, 64),
        y_test=torch.zeros(1, dtype=torch.int64),
    )


def _reply(arrays: dict[str, np.ndarray], crc: int = 7) -> Reply:
    """A site's reply as the server reads it, the arrays having crossed Flower's wire format."""
    wire = ArrayRecord({key: Array(value) for key, value in arrays.items()})
    record = MetricRecord({"num_examples": 3, "partition_id": 1, "crc": crc})
    return Reply({key: array.numpy() for key, array in wire.items()}, dict(record))


def test_server_reads_one_delta_array_and_rejects_others():
    job = _job(0.4)  # floor(0.4 * 5) = 2 top changes
    update = validate_reply(job, 5, 7, _reply({"delta": _by_hand()}))
    assert update.values.tolist() == SIGNS.tolist() and update.scale == 0.5 and update.num_examples == 3
    assert update.top is not None and update.top[0].tolist() == [1, 3]
    with pytest.raises(ValueError, match="uint8 \\(13,\\)"):
        validate_reply(job, 5, 7, _reply({"delta": _by_hand()[:-1]}))
    with pytest.raises(ValueError, match="exactly \\['delta'\\]"):  # the old three-array upload
        validate_reply(job, 5, 7, _reply({"codes": _by_hand()[:1], "scale": np.array([0.5], np.float32)}))
    with pytest.raises(ValueError, match="exactly \\['delta'\\]"):  # an extra array
        validate_reply(job, 5, 7, _reply({"delta": _by_hand(), "top": np.zeros(4, np.uint16)}))
    # with delta_topk = 0.2 the server expects one top change: the site's two are a wrong length
    with pytest.raises(ValueError, match="uint8 \\(9,\\)"):
        validate_reply(_job(0.2), 5, 7, _reply({"delta": _by_hand()}))


def test_the_round_task_record_is_typed_and_validated():
    task = replace(_job(0.025).task, round=3, num_kept=5)
    record = task.to_record()
    assert list(record)[-2:] == ["round", "num_kept"] and HideNseekTask.from_record(record) == task
    with pytest.raises(MessageError, match="'lr'"):
        HideNseekTask.from_record({**record, "lr": "fast"})
    with pytest.raises(MessageError, match="'variant'"):
        HideNseekTask.from_record({**record, "variant": "signs"})
    with pytest.raises(MessageError, match="'epochs'"):
        HideNseekTask.from_record({k: v for k, v in record.items() if k != "epochs"})
