"""Secure-aggregation fixed-point resolution vs SparseGPT masks on SmolLM2 block 0, and the largest layer-input
token norms (figures quoted in conf/privacy/secagg.yaml and docs/privacy.md).

Usage: python experiments/probes/secagg_resolution.py; python experiments/probes/token_norms.py
"""

import torch
from calibration import smollm2_with_windows  # experiments/probes/calibration.py

from fedprune.masks import parse_pattern
from fedprune.models import find_blocks, find_prunable_layers, get_weight
from fedprune.pruners import get_pruner
from fedprune.secure.plan import make_plan
from fedprune.sequential import capture_block_inputs, collect_block_stats
from fedprune.stats import Stats

model, ids = smollm2_with_windows(4, 256)
_, blocks = find_blocks(model)
inp = capture_block_inputs(model, ids, 4)
st = collect_block_stats(blocks[0], inp, "hessian")
sg = get_pruner("sparsegpt")
p = parse_pattern("unstructured")
layers = find_prunable_layers(blocks[0])
for A in (1e4, 1e3):
    code = make_plan(threshold=5, modulus_bits=64, max_sites=8, max_tokens=8192, token_bound=A).value_code()
    diff = 0
    tot = 0
    for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
        s = st[n]
        t = s.total.numpy()
        dec = code.decode_sum(code.encode(t), 1)
        s2 = Stats(s.kind, torch.from_numpy(dec), s.count)
        w = get_weight(layers[n])
        a = sg.prune(w, s, 0.5, p).mask
        b = sg.prune(w, s2, 0.5, p).mask
        diff += int((a != b).sum())
        tot += a.numel()
    print("A", A, "scale_bits", code.scale_bits, "mask differences", diff, "of", tot)
