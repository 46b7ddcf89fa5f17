"""cProfile of one whole centralized sequential pruning run on SmolLM2 (one thread by default).

Usage: python experiments/probes/profile_run.py [PRUNER] [WINDOWS] [PATTERN] [DTYPE]
       (e.g. sparsegpt 32 unstructured float32; figures quoted in the session 6 note)
"""

import cProfile
import pstats
import sys
import time

import torch
from calibration import smollm2_with_windows  # experiments/probes/calibration.py

from fedprune.masks import parse_pattern
from fedprune.pruners import get_pruner
from fedprune.sequential import prune_model_

pruner, windows = (sys.argv[1:2] or ["sparsegpt"])[0], int((sys.argv[2:3] or ["32"])[0])
pattern, dtype = (sys.argv[3:4] or ["unstructured"])[0], (sys.argv[4:5] or ["float32"])[0]
torch.set_num_threads(1)
model, ids = smollm2_with_windows(windows, 512)
model = model.to(getattr(torch, dtype))
profile = cProfile.Profile()
start = time.process_time()
profile.enable()
prune_model_(model, ids, get_pruner(pruner), 0.5, parse_pattern(pattern), 4, False)
profile.disable()
print(f"prune CPU s: {time.process_time() - start:.1f}")
pstats.Stats(profile).sort_stats("tottime").print_stats(25)
