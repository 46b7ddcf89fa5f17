"""Probe: which parts of a SmolLM2 calibration pass bfloat16 speeds up on this CPU, one thread.

python experiments/probes/bf16_kernels.py

CPU ms per call, float32 against bfloat16 inputs, at SmolLM2's shapes (micro-batch 4 x 512 tokens):
the gate/up linear (576 -> 1536; float32 through oneDNN as ``fedprune.cpu_linear`` runs it), one Gram
product per window (``torch.bmm``, as ``fedprune.stat_kinds.gram_upper_add_`` runs it on float32), and
causal attention by query chunks (9 heads, 3 key/value heads, head dim 64). Also whether this torch has
a CPU matrix product of bfloat16 inputs with a float32 result (``out_dtype``), the one kernel that would
let a Gram sum of bfloat16 activations run at bfloat16 speed and stay as exact as the float32 one.
Last, the max and RMS error against float64 of attention by query chunks and of torch's causal kernel
(random inputs of the same shape): chunking is no less accurate in either dtype.
"""

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from fedprune.cpu_attention import causal_attention_in_chunks  # noqa: E402  (after sys.path)


def cpu_ms(fn, repeats: int = 20) -> float:
    fn()
    start = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - start) / repeats * 1e3


def main() -> None:
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 512, 576, generator=generator)  # (batch, tokens, hidden)
    w = torch.randn(1536, 576, generator=generator)  # (out, in)
    q = torch.randn(4, 9, 512, 64, generator=generator)  # (batch, heads, tokens, dim)
    kv = torch.randn(4, 3, 512, 64, generator=generator)  # (batch, kv_heads, tokens, dim)
    onednn = torch.ops.mkldnn._linear_pointwise
    for dtype in (torch.float32, torch.bfloat16):
        xd, wd, qd, kvd = x.to(dtype), w.to(dtype), q.to(dtype), kv.to(dtype)
        linear = cpu_ms(lambda xd=xd, wd=wd: onednn(xd, wd, None, "none", [], ""))
        gram = cpu_ms(lambda xd=xd: torch.bmm(xd.transpose(1, 2), xd))
        attention = cpu_ms(lambda qd=qd, kvd=kvd: causal_attention_in_chunks(qd, kvd, kvd, None), repeats=5)
        print(
            f"{str(dtype):15s} linear {linear:6.1f} ms  Gram bmm {gram:6.1f} ms (result {dtype}) "
            f" chunked attention {attention:6.1f} ms",
            flush=True,
        )
    xb = x[0].bfloat16()
    try:
        got = torch.mm(xb.t(), xb, out_dtype=torch.float32)
        print("bfloat16 x bfloat16 -> float32 mm on CPU: available,", got.dtype)
    except (RuntimeError, NotImplementedError, TypeError) as error:
        print("bfloat16 x bfloat16 -> float32 mm on CPU: not available:", str(error).splitlines()[0][:120])
    print("float32 linear through F.linear (MKL) for reference:", f"{cpu_ms(lambda: F.linear(x, w)):.1f} ms")
    attention_errors(q, kv)


def attention_errors(q: torch.Tensor, kv: torch.Tensor) -> None:
    """Print each attention way's max and RMS error against float64, per dtype."""
    reference = F.scaled_dot_product_attention(
        q.double(), kv.double(), kv.double(), is_causal=True, enable_gqa=True
    )
    for dtype in (torch.float32, torch.bfloat16):
        qd, kvd = q.to(dtype), kv.to(dtype)
        ways = {
            "chunked": causal_attention_in_chunks(qd, kvd, kvd, None),
            "torch": F.scaled_dot_product_attention(qd, kvd, kvd, is_causal=True, enable_gqa=True),
        }
        for name, out in ways.items():
            error = out.double() - reference
            print(
                f"{str(dtype):15s} attention {name:8s} max err {error.abs().max().item():.3e} "
                f"rms err {error.pow(2).mean().sqrt().item():.6e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
