"""The HideNseek rounds in process (the real server routine and site task, no Flower) for fast sweeps."""
# ruff: noqa: E402  (sys.path and torch threads are set before the project imports)

import json
import sys
import time

import torch

torch.set_num_threads(1)
from hydra import compose, initialize_config_dir

from cli.main import job_of
from fedprune.hidenseek.job import build_job, validate_hidenseek
from fedprune.hidenseek.server import aggregate, run_hidenseek_rounds
from fedprune.protocols.federation import Federation
from fedprune.protocols.tasks import InProcessTransport, Site
from tests.conftest import CONF_DIR


def run(overrides, agg=None, verbose=False):
    """Test accuracy per round of the real server routine and site task, in process (``agg``: another
    aggregation ``agg(job, updates, state, ctx)``)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["protocol=hidenseek", "progress=false", *overrides])
    config = job_of(cfg)
    validate_hidenseek(config)
    torch.manual_seed(config.seed)
    job = build_job(config)
    sites = config.federation.num_clients
    transport = InProcessTransport([Site(p, {"partition-id": p, "num-partitions": sites}) for p in range(sites)])
    fed = Federation(transport, list(range(sites)), min_clients=1)
    ctx = {}
    rule = aggregate if agg is None else (lambda job, updates, state: agg(job, updates, state, ctx))
    outcome = run_hidenseek_rounds(fed, job, admit_late=False, aggregate_fn=rule)
    accs = [record.accuracy for record in outcome.records]
    if verbose:
        print(accs, flush=True)
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
