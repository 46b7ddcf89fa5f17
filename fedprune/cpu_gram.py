"""bfloat16 Gram sums on CPU from AVX512-BF16 dot products, accumulated in float32.

The bfloat16 path (``model.dtype=bfloat16``) runs its block forwards in bfloat16 but keeps the Gram sums
(SparseGPT's Hessian) as exact as a float32 model's: each window's product in float32, summed over windows
in float64. Upcasting to float32 first makes that product cost as much as in a float32 run; torch 2.13
has no bf16 x bf16 -> fp32 matrix product on CPU (``aten::mm.dtype`` is CUDA-only, oneDNN's CPU products
round their result to bfloat16). This module is that product, for the strips of
:func:`fedprune.stat_kinds.gram_upper_add_`: one small C++ kernel built on ``vdpbf16ps``, compiled once
with the system's C++ compiler into the asset cache and called through ``ctypes``.

Numerics: a product of two bfloat16 values is exact in float32, so every Gram entry is a float32 sum of
exact products, one rounding per addition, as in a float32 matrix product (on 4 windows x 512 tokens of
width 1536: 1.3e-6 from float64 relative to the largest entry, the float32 product 2.6e-7). Each entry adds its
token pairs in one fixed order (``acc += x[2p+1]x'[2p+1]; acc += x[2p]x'[2p]``, p = 0, 1, ...: the
instruction's definition), whatever the blocking or the number of threads, so the sums stay deterministic
and federated runs still equal centralized ones exactly. ``vdpbf16ps`` treats subnormal inputs and results
as zero (absolute values below 1.2e-38). It takes 0.46-0.51x the CPU time of the float32 product on an
AMD EPYC (Zen 4): ``python experiments/probes/gram_bf16_kernel.py``.

``FEDPRUNE_GRAM=torch`` turns it off (``native``, the default, keeps it on where available): the bfloat16
path then upcasts and gives bit for bit the float32 path's sums of the same values. Without a compiler,
on another CPU or another OS, the kernel is unavailable and ``torch`` is used (logged once).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ENV = "FEDPRUNE_GRAM"
BACKENDS = ("native", "torch")
GROUP = 16  # columns per 512-bit vector of float32 accumulators
CHUNK = 192  # columns per kernel call (a unit of work for a thread)

_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>

extern "C" int fp_gram_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
}

// Layout: (groups, pairs, 16) 32-bit words per window; group g holds columns 16g..16g+15, and word
// [g][p][l] packs the bfloat16 values x[2p][16g+l] (low half) and x[2p+1][16g+l] (high half).
// tile: total[row + m][col + c] += (double) sum_p of the pair products, for m < MR, c < ncols (<= 16 NV).
template <int MR, int NV>
__attribute__((target("avx512f,avx512bf16")))
static void tile(const uint32_t* __restrict lay, int64_t pairs, int64_t row, int64_t col, int64_t ncols,
                 double* __restrict total, int64_t ldt) {
  __m512 acc[MR][NV];
  const uint32_t* a[MR];
  const uint32_t* b[NV];
  for (int m = 0; m < MR; ++m) a[m] = lay + ((row + m) / 16) * pairs * 16 + (row + m) % 16;
  for (int v = 0; v < NV; ++v) b[v] = lay + (col / 16 + v) * pairs * 16;
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b[v] + p * 16);
    for (int m = 0; m < MR; ++m) {
      __m512bh av = (__m512bh)_mm512_set1_epi32((int)a[m][p * 16]);
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], av, bv[v]);
    }
  }
  float sums[16];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) {
      _mm512_storeu_ps(sums, acc[m][v]);
      double* t = total + (row + m) * ldt + col + 16 * v;
      int64_t count = ncols - 16 * v < 16 ? ncols - 16 * v : 16;
      for (int64_t l = 0; l < count; ++l) t[l] += (double)sums[l];
    }
}

#define MRMAX 8
#define NVMAX 3

template <int NV>
__attribute__((target("avx512f,avx512bf16")))
static void rows(int mr, const uint32_t* lay, int64_t pairs, int64_t row, int64_t col, int64_t nc,
                 double* total, int64_t ldt) {
  switch (mr) {
    case 8: tile<8, NV>(lay, pairs, row, col, nc, total, ldt); break;
    case 7: tile<7, NV>(lay, pairs, row, col, nc, total, ldt); break;
    case 6: tile<6, NV>(lay, pairs, row, col, nc, total, ldt); break;
    case 5: tile<5, NV>(lay, pairs, row, col, nc, total, ldt); break;
    case 4: tile<4, NV>(lay, pairs, row, col, nc, total, ldt); break;
    case 3: tile<3, NV>(lay, pairs, row, col, nc, total, ldt); break;
    case 2: tile<2, NV>(lay, pairs, row, col, nc, total, ldt); break;
    default: tile<1, NV>(lay, pairs, row, col, nc, total, ldt); break;
  }
}

// For each window w in order: total[r][c] += (double) sum_t x_w[t][r] * x_w[t][c] (a float32 sum) for
// row0 <= r < row0 + nrows, col0 <= c < col0 + ncols; col0 a multiple of 16, all columns in the layout;
// lay: windows layouts of window_words words each; total: row stride ldt.
extern "C" __attribute__((target("avx512f,avx512bf16")))
void fp_gram_add(const uint32_t* lay, int64_t windows, int64_t window_words, int64_t pairs, int64_t row0,
                 int64_t nrows, int64_t col0, int64_t ncols, double* total, int64_t ldt) {
  for (int64_t c = 0; c < ncols; c += 16 * NVMAX) {
    int64_t nc = ncols - c < 16 * NVMAX ? ncols - c : 16 * NVMAX;
    int nv = (int)((nc + 15) / 16);
    for (int64_t r = 0; r < nrows; r += MRMAX) {
      int mr = (int)(nrows - r < MRMAX ? nrows - r : MRMAX);
      for (int64_t w = 0; w < windows; ++w) {
        const uint32_t* lw = lay + w * window_words;
        if (nv == 3) rows<3>(mr, lw, pairs, row0 + r, col0 + c, nc, total, ldt);
        else if (nv == 2) rows<2>(mr, lw, pairs, row0 + r, col0 + c, nc, total, ldt);
        else rows<1>(mr, lw, pairs, row0 + r, col0 + c, nc, total, ldt);
      }
    }
  }
}
"""
_FLAGS = ("-O3", "-shared", "-fPIC")


def gram_backend() -> str:
    """The backend asked for by ``FEDPRUNE_GRAM`` (default ``native``); an unknown value is an error."""
    value = os.environ.get(ENV, "native").strip().lower() or "native"
    if value not in BACKENDS:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(BACKENDS)}")
    return value


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _build(compiler: str) -> Path:
    """The compiled kernel in the asset cache, built (atomically) if it is not there yet."""
    from fedprune.data.assets import cache_root

    digest = hashlib.sha256((_SOURCE + compiler + " ".join(_FLAGS)).encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"gram_bf16_{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        source = Path(work) / "gram_bf16.cpp"
        source.write_text(_SOURCE)
        built = Path(work) / target.name
        subprocess.run(
            [compiler, *_FLAGS, "-o", str(built), str(source)], check=True, capture_output=True, text=True
        )
        os.replace(built, target)
    logger.info("built the bfloat16 Gram kernel: %s", target)
    return target


def _self_test(function) -> bool:
    """The kernel against float64 on two small windows with ragged edges."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 37, generator=generator).to(torch.bfloat16)  # (windows, tokens, in)
    layout = _layout(x)  # (windows, groups, pairs, 16)
    got = torch.zeros(37, 37, dtype=torch.float64)
    function(layout.data_ptr(), 2, layout[0].numel(), layout.shape[2], 0, 37, 0, 37, got.data_ptr(), 37)
    reference = sum(window.double().t() @ window.double() for window in x)
    return torch.allclose(got, reference, rtol=1e-5, atol=1e-5)


@functools.cache
def _kernel():
    """The kernel's ``fp_gram_add`` through ``ctypes``, or ``None`` (with the reason logged once)."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        logger.info("bfloat16 Gram kernel: not an x86-64 Linux machine; torch's float32 product is used")
        return None
    compiler = _compiler()
    if compiler is None:
        logger.info("bfloat16 Gram kernel: no C++ compiler found; torch's float32 product is used")
        return None
    try:
        path = _build(compiler)
        library = ctypes.CDLL(str(path))
        if not library.fp_gram_supported():
            logger.info("bfloat16 Gram kernel: this CPU lacks AVX512-BF16; torch's float32 product is used")
            return None
        function = library.fp_gram_add
        i64 = ctypes.c_int64
        function.argtypes = [ctypes.c_void_p, i64, i64, i64, i64, i64, i64, i64, ctypes.c_void_p, i64]
        function.restype = None
    except (OSError, subprocess.CalledProcessError, AttributeError) as error:
        detail = getattr(error, "stderr", "") or error
        logger.warning("bfloat16 Gram kernel unavailable (%s); torch's float32 product is used", detail)
        return None
    if not _self_test(function):
        logger.warning("bfloat16 Gram kernel disagrees with float64 on a self-test; torch's product is used")
        return None
    logger.info("bfloat16 Gram sums through the AVX512-BF16 kernel (%s)", path)
    return function


def native_gram_available() -> bool:
    """Whether bfloat16 Gram sums go through the kernel (asked for, built and working here)."""
    return gram_backend() == "native" and _kernel() is not None


def _layout(xw: torch.Tensor) -> torch.Tensor:
    """``(windows, tokens, in)`` bfloat16 -> the kernel's ``(windows, groups, pairs, 16)`` int32 words: token
    pairs packed into one word per column, columns in groups of 16 (zero-padded: zeros add nothing)."""
    windows, tokens, n = xw.shape
    padded = torch.nn.functional.pad(xw, (0, -n % GROUP, 0, tokens % 2))  # (windows, tokens', in')
    pairs, width = padded.shape[1] // 2, padded.shape[2]
    words = padded.reshape(windows, pairs, 2, width).transpose(2, 3).contiguous().view(torch.int32)
    # words: (windows, pairs, in', 1) -> (windows, groups, pairs, 16)
    return words.reshape(windows, pairs, width // GROUP, GROUP).permute(0, 2, 1, 3).contiguous()


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fedprune-gram")


os.register_at_fork(after_in_child=_pool.cache_clear)  # a forked child has none of the parent's threads


def gram_upper_add_bf16_(
    total: torch.Tensor, xw: torch.Tensor, tile: int, chunk: int = CHUNK
) -> torch.Tensor:
    """:func:`fedprune.stat_kinds.gram_upper_add_` for bfloat16 windows through the kernel: each window's
    strip products (float32 sums of exact products) added to ``total`` ``(in, in)`` float64 in place, one
    window after another. ``xw``: ``(windows, tokens, in)`` bfloat16; ``tile`` a multiple of 16. The strips
    are cut into column chunks, one call each, on ``torch.get_num_threads()`` threads (ctypes releases
    the GIL; the calls write disjoint parts of ``total``)."""
    function = _kernel()
    windows, _, n = xw.shape
    if function is None or xw.dtype is not torch.bfloat16 or tile % GROUP or chunk % GROUP:
        raise ValueError("gram_upper_add_bf16_ needs the kernel, bfloat16 windows and multiples of 16")
    if tuple(total.shape) != (n, n) or total.dtype is not torch.float64 or not total.is_contiguous():
        raise ValueError(f"a Gram sum of width {n} needs a contiguous float64 ({n}, {n}) total")
    layout = _layout(xw)  # (windows, groups, pairs, 16)
    pairs, words = layout.shape[2], layout[0].numel()
    calls = [
        (i, min(tile, n - i), c, min(chunk, n - c)) for i in range(0, n, tile) for c in range(i, n, chunk)
    ]  # (row0, rows, col0, cols): widest strips first

    def call(task: tuple[int, int, int, int]) -> None:
        row0, rows, col0, cols = task
        function(layout.data_ptr(), windows, words, pairs, row0, rows, col0, cols, total.data_ptr(), n)

    threads = max(1, min(torch.get_num_threads(), len(calls)))
    if threads == 1:
        for task in calls:
            call(task)
    else:
        list(_pool(threads).map(call, calls))
    return total
