"""Where a score tile's time goes in NumPy, beside torch's fused attention on the same tile, on one core.

Run from the repository root (needs torch; numba for the fused column):

    python benchmarks/bench_passes.py [--repeats 200] [--dispatch native|avx2] [--out benchmarks/results]

One tile is ``q [T, d] @ k.T -> s [T, S]``, the softmax passes over ``s`` and
``s @ v``: the NumPy calls our chunk loop makes per tile without numba (max,
subtract in place, exp in place, row sum), each timed alone (medians), and the
compiled step that replaces them with numba (``fused``: max, subtract, exp, row
sum and the rescaling of the running sum and accumulator, row by row), beside
``torch.nn.functional.scaled_dot_product_attention`` on the same numbers
(torch's CPU flash kernel fuses the passes over cache-sized blocks). One BLAS
and one torch thread, so the figures are per core. The question it answers:
how far the GEMMs alone already are from torch's whole call, and what the
element-wise passes add.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _common import add_dispatch_argument, apply_dispatch, header, median_time, new_result, write_result

TILES = ((256, 1024, 32), (1024, 1024, 32), (512, 4096, 32), (8, 4096, 64))


def _median_ms(fn, repeats: int) -> float:
    return median_time(fn, repeats) * 1e3


def measure(T: int, S: int, d: int, repeats: int) -> dict:
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((n, d), dtype=np.float32) for n in (T, S, S))
    q *= d**-0.5
    s, m, out = np.empty((T, S), np.float32), np.empty((T, 1), np.float32), np.empty((T, d), np.float32)
    np.matmul(q, k.T, out=s)
    np.max(s, axis=1, keepdims=True, out=m)
    scores, shifted = s.copy(), s - m  # each pass reads real values, never its own output (exp of exp overflows)
    passes = {
        "gemm_qk": lambda: np.matmul(q, k.T, out=s),
        "max": lambda: np.max(scores, axis=1, keepdims=True, out=m),
        "subtract": lambda: np.subtract(scores, m, out=s),
        "exp": lambda: np.exp(shifted, out=s),
        "sum": lambda: np.sum(s, axis=1, keepdims=True, out=m),
        "gemm_pv": lambda: np.matmul(s, v, out=out),
    }
    row = {name: _median_ms(fn, repeats) for name, fn in passes.items()}
    row["fused"] = _fused_ms(scores, d, repeats)
    tq, tk, tv = (torch.from_numpy(a)[None, None] for a in (q * d**0.5, k, v))
    row["torch_sdpa"] = _median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv), repeats)
    gemm = row["gemm_qk"] + row["gemm_pv"]
    elementwise = row["max"] + row["subtract"] + row["exp"] + row["sum"]
    fused = None if row["fused"] is None else (gemm + row["fused"]) / row["torch_sdpa"]
    return {"tile": [T, S, d], "ms": row, "gemm_ms": gemm, "elementwise_ms": elementwise,
            "gemm_over_torch": gemm / row["torch_sdpa"], "total_over_torch": (gemm + elementwise) / row["torch_sdpa"],
            "fused_total_over_torch": fused}


def _fused_ms(scores, d: int, repeats: int) -> float | None:
    """The compiled step over a copy of the tile, refreshed before each call outside the timing."""
    import time

    import numpy as np

    from mha_cupy._backends import _numba

    kernels = _numba.load()
    if kernels is None:
        return None
    T = scores.shape[0]
    work, m, l, acc = scores.copy(), np.empty(T, np.float32), np.empty(T, np.float32), np.empty((T, d), np.float32)
    times = []
    for _ in range(repeats + 1):
        work[...] = scores
        m[...], l[...], acc[...] = -np.inf, 0.0, 0.0
        t0 = time.perf_counter()
        kernels.softmax_chunk(work, m, l, acc)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:])) * 1e3


def main() -> int:
    from threadpoolctl import threadpool_limits
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per pass (default 200)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    add_dispatch_argument(parser)
    args = parser.parse_args()
    apply_dispatch(args.dispatch)
    torch.set_num_threads(1)
    with threadpool_limits(1):
        rows = [measure(*tile, args.repeats) for tile in TILES]
    result = new_result(rows, dispatch=args.dispatch)
    lines = header(f"One score tile: NumPy's passes and the fused step beside torch's fused SDPA, one core, "
                   f"{args.dispatch} dispatch", result,
                   "float32, medians in ms; q pre-scaled; one BLAS thread, one torch thread; "
                   "fused = the numba step replacing max, subtract, exp and sum (and the rescaling)") + [
        "| tile T x S x d | QK GEMM | max | subtract | exp | sum | PV GEMM | GEMMs | element-wise | fused | torch SDPA "
        "| GEMMs / torch | NumPy total / torch | with fused / torch |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = r["ms"]
        fused = "—" if ms["fused"] is None else f"{ms['fused']:.3f}"
        ratio = "—" if r["fused_total_over_torch"] is None else f"{r['fused_total_over_torch']:.2f}"
        lines.append(f"| {' x '.join(map(str, r['tile']))} | " + " | ".join(f"{ms[k]:.3f}" for k in (
            "gemm_qk", "max", "subtract", "exp", "sum", "gemm_pv")) + f" | {r['gemm_ms']:.3f} | {r['elementwise_ms']:.3f} "
            f"| {fused} | {ms['torch_sdpa']:.3f} | {r['gemm_over_torch']:.2f} | {r['total_over_torch']:.2f} | {ratio} |")
        print(lines[-1], flush=True)
    write_result(result, f"passes-{args.dispatch}", args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
