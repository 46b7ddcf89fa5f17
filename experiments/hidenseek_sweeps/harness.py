"""In-process mirror of the Flower HideNseek loop (same data, seeds, client code) for fast sweeps."""
# ruff: noqa: E402  (sys.path and torch threads are set before the project imports)

import json
import sys
import time

import torch

torch.set_num_threads(1)
from hydra import compose, initialize_config_dir

from cli.hidenseek import build_job, validate_hidenseek
from clients.hidenseek_client import local_round, site_data
from fedprune.hidenseek.aggregate import num_kept_weights, top_count, unpack_delta_upload, unpack_signs
from server.hidenseek_workflow import (
    SiteUpdate,
    aggregate,
    initial_state,
    round_arrays,
    test_accuracy,
)
from tests.conftest import CONF_DIR


def run(overrides, agg=None, verbose=False):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["protocol=hidenseek", "progress=false", *overrides])
    validate_hidenseek(cfg)
    torch.manual_seed(int(cfg.seed))
    job = build_job(cfg)
    K = int(cfg.federation.num_clients)
    num_kept = num_kept_weights(job.masks)
    state = initial_state(job)
    accs = [test_accuracy(job, state)]
    ctx = {}
    for r in range(1, job.rounds + 1):
        arrays = round_arrays(job, state)
        config = {**job.site_config, "round": r, "num_kept": num_kept}
        updates = []
        for pid in range(K):
            x, y = site_data(config, pid, K)
            payload = local_round(config, arrays, x, y, pid)
            if "delta" in payload:
                count = top_count(num_kept, float(config["delta_topk"]))
                vals, scale, top = unpack_delta_upload(payload["delta"], num_kept, count)
                updates.append(SiteUpdate(pid, int(y.numel()), vals, scale, top))
                continue
            key = "codes" if "codes" in payload else next(iter(payload))
            v = payload[key]
            vals = unpack_signs(torch.from_numpy(v), num_kept) if key == "codes" else torch.from_numpy(v)
            updates.append(SiteUpdate(pid, int(y.numel()), vals))
        state = aggregate(job, updates, state) if agg is None else agg(job, updates, state, ctx)
        accs.append(test_accuracy(job, state))
        if verbose:
            print(r, round(accs[-1], 3), flush=True)
    return accs


if __name__ == "__main__":
    t = time.time()
    accs = run(sys.argv[1:])
    print(
        json.dumps(
            {
                "args": sys.argv[1:],
                "final": round(accs[-1], 3),
                "best": round(max(accs), 3),
                "acc": [round(a, 3) for a in accs],
                "s": round(time.time() - t),
            }
        )
    )
