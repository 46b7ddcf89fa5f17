"""Profile fedprune's centralized prune_model_ on SmolLM2 at one thread (cProfile, by own time and cumulative).

python experiments/profile_prune.py wanda unstructured 32
"""

import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedprune.data.assets import ensure_corpus, ensure_model  # noqa: E402  (after sys.path)
from fedprune.data.corpus import load_works, split_works  # noqa: E402  (after sys.path)
from fedprune.data.windows import sample_windows, tokenize_works  # noqa: E402  (after sys.path)
from fedprune.masks import parse_pattern  # noqa: E402  (after sys.path)
from fedprune.models import load_causal_lm, load_tokenizer  # noqa: E402  (after sys.path)
from fedprune.pruners import get_pruner  # noqa: E402  (after sys.path)
from fedprune.sequential import prune_model_  # noqa: E402  (after sys.path)

MODEL = "smollm2-135m"
pr, pat, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
path = ensure_model(MODEL)
tok = load_tokenizer(path)
calib, held = split_works(load_works(ensure_corpus("shakespeare")))
ids = sample_windows(tokenize_works(tok, calib), n, 512, seed=0)
model = load_causal_lm(path)
params = {"percdamp": 0.01, "blocksize": 128} if pr == "sparsegpt" else {}
pruner = get_pruner(pr, **params)
prof = cProfile.Profile()
c0 = time.process_time()
t0 = time.perf_counter()
prof.enable()
prune_model_(model, ids, pruner, 0.5, parse_pattern(pat), 4, False)
prof.disable()
print("prune cpu", time.process_time() - c0, "wall", time.perf_counter() - t0)
c0 = time.process_time()
with torch.no_grad():
    for i in range(0, n, 4):
        model(ids[i : i + 4])
print("forward cpu", time.process_time() - c0)
st = pstats.Stats(prof)
st.sort_stats("tottime").print_stats(25)
st.sort_stats("cumulative").print_stats(40)
