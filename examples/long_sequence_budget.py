"""A long sequence under a memory budget
=====================================

A long sequence under a memory budget: the score matrix is never built, the working set stays bounded.

Run: ``python examples/long_sequence_budget.py [--quick]``.
At L=16384 and 6 heads the float32 score matrix alone would be 6.4 GB. The
core walks keys in chunks with an online softmax, so its working set is
bounded by ``memory_budget`` (default 32 MiB on CPUs). NumPy reports its
allocations to ``tracemalloc``, which measures the peak here; the peak
includes the output itself.
"""

from __future__ import annotations

import time
import tracemalloc

import numpy as np

import mha_cupy
from _needs import command_line, finish


def main(argv: list[str] | None = None) -> int:
    args = command_line(__doc__).parse_args(argv)
    L, N, d = (2048, 2, 32) if args.quick else (16384, 6, 32)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, L, N, d), dtype=np.float32) for _ in range(3))
    scores = L * L * N * 4
    print(f"L={L}, {N} heads, d={d}: the float32 scores alone would take {scores / 2**20:,.0f} MiB")

    mha_cupy.scaled_dot_product_attention(q[:, :64], k[:, :64], v[:, :64])  # warm-up: starts the worker threads
    within = True
    for budget in ("4MiB", None):
        limit = mha_cupy.get_memory_budget() if budget is None else 4 * 2**20
        shown = budget or f"default ({limit / 2**20:.0f} MiB)"
        tracemalloc.start()
        t0 = time.perf_counter()
        out = mha_cupy.scaled_dot_product_attention(q, k, v, memory_budget=budget)
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        within &= peak <= limit + out.nbytes
        print(f"budget {shown}: {elapsed:.2f} s, peak NumPy allocations {peak / 2**20:.1f} MiB "
              f"(output {out.nbytes / 2**20:.1f} MiB)")

    # A check that the chunked result is right: a few rows computed directly in float64.
    rows = slice(0, 4)
    logits = np.einsum("tnd,snd->nts", q[0, rows].astype(np.float64), k[0].astype(np.float64)) / np.sqrt(d)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    direct = np.einsum("nts,snd->tnd", weights / weights.sum(-1, keepdims=True), v[0].astype(np.float64))
    c = mha_cupy.compare(out[0, rows], direct)
    print(f"first rows vs a direct float64 computation: {c}")
    return 0 if c.ok and within else 1


if __name__ == "__main__":
    finish(main())
