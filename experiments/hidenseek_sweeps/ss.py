"""Prototype: server-held real scores G; clients start from G, upload 1 bit of (score - G)."""
# ruff: noqa: E402  (sys.path and torch threads are set before the project imports)

import json
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
import torch

torch.set_num_threads(1)
import sweep as sweep_lib
from hydra import compose, initialize_config_dir

from cli.main import job_of
from fedprune.hidenseek.aggregate import gather_kept, scatter_kept
from fedprune.hidenseek.job import build_job
from fedprune.hidenseek.sign_supermask import supermask_layers, to_supermask, train_scores
from fedprune.hidenseek.site import site_data
from fedprune.hidenseek.train import accuracy
from tests.conftest import CONF_DIR


def model_from(job, G):
    full = scatter_kept(G, job.masks, fill=0.1)
    m = to_supermask(
        job.base_model,
        job.masks,
        {k: torch.where(v >= 0, 1, -1).to(torch.int8) for k, v in full.items()},
        "sign",
        0.1,
    )
    with torch.no_grad():
        for k, layer in supermask_layers(m).items():
            layer.scores.copy_(full[k])
    return m


def run(
    K=3,
    alpha=0.1,
    rounds=20,
    epochs=5,
    lr=1.0,
    mode="float",
    eta=1.0,
    restricted=False,
    opt="sgd",
    beta=0.0,
    seed=0,
):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                "protocol=hidenseek",
                f"federation.num_clients={K}",
                f"federation.min_clients={K}",
                f"protocol.alpha={alpha}",
            ],
        )
    torch.manual_seed(0)
    job = build_job(job_of(cfg))
    n = sum(int(m.sum()) for m in job.masks.values())
    G = torch.full((n,), 0.1)
    mom = torch.zeros(n)
    conf = job.task
    accs = [accuracy(model_from(job, G), job.x_test, job.y_test)]
    rng = torch.Generator().manual_seed(seed + 123)
    ts = sweep_lib.restricted_train_scores if restricted else train_scores
    for r in range(1, rounds + 1):
        deltas, counts = [], []
        for pid in range(K):
            x, y = site_data(conf, pid, K)
            tr = ts(model_from(job, G), x, y, epochs, lr, 32, 10000 * r + pid, opt, 0.9)
            s = gather_kept(
                {k: layer.scores.detach() for k, layer in supermask_layers(tr).items()}, job.masks
            )
            d = s - G
            if mode == "sign":
                q = torch.sign(d)
            elif mode == "scaledsign":
                q = d.abs().mean() * torch.sign(d)
            elif mode == "lsign":
                sizes = [int(m.sum()) for m in job.masks.values()]
                q = torch.cat([c.abs().mean() * torch.sign(c) for c in torch.split(d, sizes)])
            elif mode == "stoch":
                B = d.abs().max().clamp_min(1e-12)
                q = B * torch.where(torch.rand(n, generator=rng) < (1 + d / B) / 2, 1.0, -1.0)
            elif mode.startswith("stochq"):  # clip at a quantile scale
                B = torch.quantile(d.abs(), float(mode[6:])).clamp_min(1e-12)
                dc = d.clamp(-B, B)
                q = B * torch.where(torch.rand(n, generator=rng) < (1 + dc / B) / 2, 1.0, -1.0)
            else:
                q = d
            deltas.append(q)
            counts.append(int(y.numel()))
        w = torch.tensor(counts, dtype=torch.float32)
        w = w / w.sum()
        upd = (w[:, None] * torch.stack(deltas)).sum(0)
        mom = beta * mom + upd
        G = G + eta * mom
        accs.append(accuracy(model_from(job, G), job.x_test, job.y_test))
    return accs


if __name__ == "__main__":
    for spec in sys.argv[1:]:
        kw = dict(kv.split("=") for kv in spec.split(",") if kv)
        typed = {
            k: (
                v
                if k in ("mode", "opt")
                else (v == "1")
                if k == "restricted"
                else float(v)
                if "." in v
                else int(v)
            )
            for k, v in kw.items()
        }
        t = time.time()
        accs = run(**typed)
        rec = {
            "ss": spec,
            "final": round(accs[-1], 3),
            "best": round(max(accs), 3),
            "last5": round(sum(accs[-5:]) / 5, 3),
            "acc": [round(a, 3) for a in accs],
            "s": round(time.time() - t),
        }
        print(json.dumps(rec), flush=True)
        open("results.jsonl", "a").write(json.dumps(rec) + "\n")
