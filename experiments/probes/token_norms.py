"""Largest and mean L2 norm of each prunable layer input over SmolLM2 (4 windows of 512 tokens).

Usage: python experiments/probes/token_norms.py
"""

import torch
from calibration import smollm2_with_windows  # experiments/probes/calibration.py

from fedprune.models import find_blocks, find_prunable_layers
from fedprune.sequential import capture_block_inputs, run_block

model, ids = smollm2_with_windows(4, 512)
_, blocks = find_blocks(model)
inp = capture_block_inputs(model, ids, 4)
mx = {}


def hook(name):
    def h(m, a, o):
        x = a[0]
        n = torch.linalg.vector_norm(x, dim=-1)
        mx[name] = max(mx.get(name, 0), float(n.max()))
        mx[name + "_mean"] = float(n.mean())

    return h


worst = 0
worst_mean = 0
for blk in blocks:
    hs = [layer.register_forward_hook(hook(n)) for n, layer in find_prunable_layers(blk).items()]
    inp2 = run_block(blk, inp)
    for h in hs:
        h.remove()
    inp = inp2
    m = max(v for k, v in mx.items() if not k.endswith("_mean"))
    worst = max(worst, m)
print("max token norm over all layer inputs", worst)
print({k: round(v, 1) for k, v in mx.items()})
