"""cProfile of a stats_sync job with 8 in-process sites (the same site and server code a Flower run
executes, without Ray), one thread: where the federation's own overhead goes.

Usage: python experiments/probes/profile_federated.py [WINDOWS] [PRUNER]   (e.g. 32 sparsegpt)
"""

import cProfile
import pstats
import sys
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from cli.main import job_of
from fedprune.protocols.catalog import validate
from fedprune.protocols.tasks import in_process_launcher

windows, pruner = int((sys.argv[1:2] or ["32"])[0]), (sys.argv[2:3] or ["sparsegpt"])[0]
torch.set_num_threads(1)
conf = Path(__file__).resolve().parents[2] / "conf"
overrides = [
    f"pruner={pruner}", "protocol=stats_sync", "federation.num_clients=8", "federation.min_clients=8",
    f"data.calib_windows={windows}", "data.seq_len=512", "data.eval_windows=2", "save_model=false",
    "progress=false",
]
with initialize_config_dir(config_dir=str(conf), version_base=None):
    job = job_of(compose("config", overrides=overrides))
profile = cProfile.Profile()
profile.enable()
metrics = validate(job).run(job, Path(tempfile.mkdtemp()), in_process_launcher(8, 8))
profile.disable()
print({k: metrics[k] for k in ("prune_s", "prune_cpu_s", "ppl_pruned")})
pstats.Stats(profile).sort_stats("tottime").print_stats(30)
