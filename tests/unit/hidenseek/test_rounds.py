"""Client/server round steps and a tiny in-process (no Flower) HideNseek run on digits."""

from __future__ import annotations

import time

import pytest
import torch

from fedprune.hidenseek.aggregate import pack_signs, unpack_signs
from fedprune.hidenseek.data import dirichlet_label_partition, load_digits_split
from fedprune.hidenseek.models import build_model, prunable_weights
from fedprune.hidenseek.rounds import (
    client_update,
    codes_of_scores,
    global_model,
    initial_codes,
    run_in_process,
    server_update,
    set_kept_scores_,
)
from fedprune.hidenseek.sign_supermask import learned_codes, supermask_layers
from fedprune.hidenseek.synflow import synflow_masks


def test_server_update_votes_over_packed_uploads():
    current = torch.tensor([1, -1, 1, -1, 1], dtype=torch.int8)
    uploads = [
        pack_signs(torch.tensor([1, 1, -1, -1, 1], dtype=torch.int8)),
        pack_signs(torch.tensor([-1, 1, 1, -1, -1], dtype=torch.int8)),
    ]
    # votes [0, 2, 0, -2, 0]: ties keep current at 0, 2, 4
    assert server_update(uploads, current).tolist() == [1, 1, 1, -1, 1]


def test_client_update_uploads_one_bit_per_kept_weight_and_starts_from_global():
    model = build_model("mlp", seed=0, hidden=16)
    masks = synflow_masks(model, 0.25, iterations=5)
    codes = initial_codes(masks)
    n_kept = codes.numel()
    assert n_kept == round(0.25 * (64 * 16 + 16 * 16 + 16 * 10))
    generator = torch.Generator().manual_seed(0)
    flipped = codes.clone()
    flipped[torch.randperm(n_kept, generator=generator)[:10]] = -1
    start = global_model(model, masks, flipped)
    assert int((torch.cat([c[masks[n]] for n, c in learned_codes(start).items()]) == -1).sum()) == 10
    x = torch.rand(40, 64, generator=generator)
    y = torch.randint(0, 10, (40,), generator=generator)
    packed = client_update(model, masks, flipped, x, y, epochs=1, lr=1.0, batch_size=20, seed=0)
    assert packed.dtype == torch.uint8 and packed.numel() == (n_kept + 7) // 8
    assert unpack_signs(packed, n_kept).abs().min() == 1


def test_in_process_hidenseek_on_digits_beats_chance_and_untrained_mask():
    torch.set_num_threads(1)
    split = load_digits_split(test_fraction=0.2, seed=0)
    model = build_model("mlp", seed=0, hidden=128)
    masks = synflow_masks(model, 0.5, iterations=20)
    parts = dirichlet_label_partition(split.y_train, num_clients=3, alpha=0.5, seed=0, min_size=50)
    clients = [(split.x_train[p], split.y_train[p]) for p in parts]
    start = time.perf_counter()
    logs = run_in_process(
        model, masks, clients, split.x_test, split.y_test, rounds=8, epochs=2, lr=1.0, batch_size=32, seed=0
    )
    elapsed = time.perf_counter() - start
    accuracies = [log.test_accuracy for log in logs]
    print(f"hidenseek digits mlp density .5: accuracies {accuracies}, {elapsed:.2f} s")
    untrained = accuracies[0]
    assert untrained < 0.3  # the pruned random network with all-+1 signs is near chance
    assert accuracies[-1] > 0.5
    assert accuracies[-1] > untrained + 0.3
    kept = sum(int(m.sum()) for m in masks.values())
    assert logs[-1].upload_bytes_per_client == (kept + 7) // 8


def test_set_kept_scores_writes_kept_entries_in_mask_order():
    model = build_model("mlp", 0, "kaiming_normal", hidden=4)
    masks = {name: torch.zeros_like(w, dtype=torch.bool) for name, w in prunable_weights(model).items()}
    first, last = list(masks)[0], list(masks)[-1]
    masks[first][0, :2] = True
    masks[last][1, 3] = True
    supermask = global_model(model, masks, initial_codes(masks), "sign", 0.1)
    set_kept_scores_(supermask, torch.tensor([-0.5, 0.2, -0.3]), masks)
    layers = supermask_layers(supermask)
    assert layers[first].scores[0, :3].tolist() == pytest.approx([-0.5, 0.2, 0.1])  # unkept stays 0.1
    assert layers[last].scores[1, 3].item() == pytest.approx(-0.3)
    assert codes_of_scores(torch.tensor([-0.5, 0.0, 0.2])).tolist() == [-1, 1, 1]
