"""The compiled CPU kernels against this CPU's FMA peak and OpenBLAS, on one core.

Run from the repository root (needs ``pip install ".[fast]"``):

    python benchmarks/bench_kernels.py [--repeats 9] [--dispatch native|avx2] [--out benchmarks/results]

- **peak**: a plain multiply-add loop in numba (eight independent chains per element, 16 steps each, vectorised
  over 4,096 elements that stay in L1): what one core's floating-point units give numba-compiled code, with and
  without FMA contraction (the fixed-order kernels round every product and sum, so they use no FMA).
- **attend_chunk**: one key chunk of 512 keys for 6 heads x 336 query rows (the fused fixed-order kernel of
  ``batch_invariant``), head sizes 32 and 64, GFLOP/s counted as ``4 R s H`` per head.
- **matmul_fixed**: the fixed-order product at the layer's projection shape ``[24576, 192] @ [192, 576]``.
- **step by step**: the same chunk as OpenBLAS ``q k^T``, the numba ``softmax_chunk`` and OpenBLAS ``p v`` (the
  default mode's chunk step, not batch-invariant).

Medians of ``--repeats`` calls after one warm-up, OpenBLAS held to one thread. Results go to
``<out>/kernels-<dispatch>-<date>.json`` and ``.md`` with the machine, versions and command.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from _common import add_dispatch_argument, apply_dispatch, header, median_time, new_result, write_result


def _peak(contract: bool):
    """A multiply-add loop whose chains stay in registers: eight per element, 16 steps each, unrolled."""
    import numba
    import numpy as np

    chains = [f"x{i}" for i in range(8)]
    lines = ["def peak(a, b, c, n):", "    for _ in range(n):", "        for j in range(a.shape[0]):"]
    lines += [f"            {x} = a[j] + np.float32({i})" for i, x in enumerate(chains)]
    lines += [f"            {x} = {x} * b + c" for _ in range(16) for x in chains]
    lines += [f"            a[j] = {' + '.join(chains)}"]
    namespace = {"np": np}
    exec("\n".join(lines), namespace)  # noqa: S102 - the loop written out, as numba needs it
    fn = numba.njit(nogil=True, fastmath={"contract"} if contract else False)(namespace["peak"])
    return fn, 2 * 8 * 16  # flops per element and pass


def measure(repeats: int) -> list[dict]:
    import numpy as np
    from threadpoolctl import threadpool_limits

    from mha_cupy._backends import _numba

    kernels = _numba.load()
    if kernels is None:
        raise SystemExit('numba is needed: pip install ".[fast]"')
    rows = []
    a = np.full(4096, 0.5, np.float32)
    for contract in (True, False):
        fn, flops = _peak(contract)
        n = 200
        dt = median_time(lambda fn=fn: fn(a, np.float32(0.999), np.float32(1e-3), n), repeats)
        rows.append({"kernel": f"peak multiply-add loop ({'FMA' if contract else 'no FMA'})",
                     "gflops": flops * a.size * n / dt / 1e9, "seconds": dt})
    rng = np.random.default_rng(0)
    P, R, s = 6, 336, 512
    with threadpool_limits(1, user_api="blas"):
        for H in (32, 64):
            q = (rng.standard_normal((P, R, H)) / math.sqrt(H)).astype(np.float32)
            kt = rng.standard_normal((P, H, s)).astype(np.float32)
            v = rng.standard_normal((P, s, H)).astype(np.float32)
            flops = 4 * P * R * s * H

            def fused(q=q, kt=kt, v=v, H=H):
                m, l = np.full((P, R), -np.inf, np.float32), np.zeros((P, R), np.float32)
                kernels.attend_chunk(q, kt, v, m, l, np.zeros((P, R, H), np.float32), np.ones((1, 1, 1, 1, 1), bool),
                                     False, P, 1, np.empty((4, s), np.float32), np.empty((4, H), np.float32))

            def steps(q=q, kt=kt, v=v, H=H):
                m, l = np.full((P * R,), -np.inf, np.float32), np.zeros((P * R,), np.float32)
                acc, scores = np.zeros((P, R, H), np.float32), np.matmul(q, kt)
                kernels.softmax_chunk(scores.reshape(P * R, s), m, l, acc.reshape(P * R, H))
                acc += scores @ v

            for name, fn in (("attend_chunk (fused, fixed order)", fused), ("step by step (OpenBLAS, numba softmax)",
                                                                              steps)):
                dt = median_time(fn, repeats)
                rows.append({"kernel": f"{name}, H={H}", "gflops": flops / dt / 1e9, "seconds": dt})
        x, w = rng.standard_normal((1, 24576, 192)).astype(np.float32), rng.standard_normal((1, 192, 576)).astype(np.float32)
        out = np.empty((1, 24576, 576), np.float32)
        for name, fn in (("matmul_fixed [24576, 192] @ [192, 576]", lambda: kernels.matmul_fixed(x, w, out)),
                         ("OpenBLAS sgemm, same shape", lambda: np.matmul(x[0], w[0], out=out[0]))):
            dt = median_time(fn, repeats)
            rows.append({"kernel": name, "gflops": 2 * 24576 * 192 * 576 / dt / 1e9, "seconds": dt})
    peak = rows[0]["gflops"]
    for r in rows:
        r["fraction_of_fma_peak"] = r["gflops"] / peak
    return rows


def _markdown(result: dict) -> list[str]:
    lines = header(f"Compiled CPU kernels, one core, {result['dispatch']} dispatch", result)
    lines += ["", "| kernel | GFLOP/s | of the FMA loop's peak | median (ms) |", "|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['gflops']:.1f} | {r['fraction_of_fma_peak']:.0%} | {r['seconds'] * 1e3:.2f} |"
              for r in result["rows"]]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    add_dispatch_argument(parser)
    args = parser.parse_args()
    apply_dispatch(args.dispatch)
    rows = measure(args.repeats)
    for r in rows:
        print(f"{r['kernel']:45s} {r['gflops']:7.1f} GFLOP/s  {r['fraction_of_fma_peak']:5.0%}", flush=True)
    result = new_result(rows, dispatch=args.dispatch)
    write_result(result, f"kernels-{args.dispatch}", args.out, _markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
