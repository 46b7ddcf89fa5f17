"""Probe: is attention by query chunks (fedprune.cpu_attention) less accurate than torch's kernel, in
float32 and in bfloat16? Both against a float64 reference, on SmolLM2's attention shape (micro-batch 4,
9 query heads, 3 key/value heads, 512 tokens, head dim 64), random inputs; also their CPU times.

python experiments/probes/attention_accuracy.py    # one thread
Prints, per dtype, the max and RMS error against float64 of each, and ms per call.
"""

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from fedprune.cpu_attention import causal_attention_in_chunks  # noqa: E402  (after sys.path)


def cpu_ms(fn, repeats: int = 10) -> float:
    fn()
    start = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - start) / repeats * 1e3


def main() -> None:
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(4, 9, 512, 64, generator=generator)  # (batch, heads, tokens, dim)
    k = torch.randn(4, 3, 512, 64, generator=generator)  # (batch, kv_heads, tokens, dim)
    v = torch.randn(4, 3, 512, 64, generator=generator)
    reference = F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True
    )
    for dtype in (torch.float32, torch.bfloat16):
        qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
        ways = {
            "chunked": lambda qd=qd, kd=kd, vd=vd: causal_attention_in_chunks(qd, kd, vd, None),
            "torch": lambda qd=qd, kd=kd, vd=vd: F.scaled_dot_product_attention(
                qd, kd, vd, is_causal=True, enable_gqa=True
            ),
        }
        for name, fn in ways.items():
            error = fn().double() - reference
            print(
                f"{str(dtype):15s} {name:8s} max err {error.abs().max().item():.3e} "
                f"rms err {error.pow(2).mean().sqrt().item():.6e} cpu {cpu_ms(fn):.1f} ms",
                flush=True,
            )


if __name__ == "__main__":
    main()
