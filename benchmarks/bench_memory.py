"""Peak memory growth and time of long-sequence and grouped-KV attention, mha_cupy vs torch, side by side.

Run from the repository root:

    python benchmarks/bench_memory.py [--repeats 3] [--cases long,gqa,save_peak] [--out benchmarks/results]

Each (case, implementation) runs in a fresh child process: inputs are made,
one small warm-up call runs, the kernel's peak-RSS mark is reset
(``/proc/self/clear_refs``), then the measured call runs; its peak RSS growth
over the pre-call RSS is the memory figure, and the median of ``--repeats``
calls is the time. Results go to ``<out>/memory-<date>.json`` and ``.md``
with the machine, versions and command.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# tabpfn 2.2.1 pins scikit-learn < 1.7, which needs SciPy's array API mode beside array-api-compat.
os.environ.setdefault("SCIPY_ARRAY_API", "1")

CASES = {
    # name: (description, implementations)
    "long": ("self-attention B=1, H=6, L=16384, d=32, float32, default arguments", ["mha_cupy", "torch"]),
    "gqa": ("GQA H=8 on H_kv=1, L_q=256, L_kv=262144, d=64, float32, default arguments", ["mha_cupy", "torch"]),
    "save_peak": ("layer E=96, H=4, d=24, x [128, 256, 96] float32, add_input+allow_inplace: factor None vs 8",
                  ["mha_cupy", "mha_cupy_f8", "tabpfn", "tabpfn_f8"]),
}


from _common import header, new_result, write_result  # noqa: E402

from mha_cupy.cli._memory import reset_peak, status  # noqa: E402


def _child(case: str, impl: str, repeats: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    torch = None
    if impl.startswith(("torch", "tabpfn")):
        import torch

        torch.set_grad_enabled(False)
    if case in ("long", "gqa"):
        if case == "long":
            shapes = [(1, 16384, 6, 32)] * 3
        else:
            shapes = [(1, 256, 8, 64), (1, 262144, 1, 64), (1, 262144, 1, 64)]
        q, k, v = (rng.standard_normal(s, dtype=np.float32) for s in shapes)
        if impl == "mha_cupy":
            from mha_cupy import scaled_dot_product_attention

            def run(small: bool = False):
                if small:
                    return scaled_dot_product_attention(q[:, :8], k[:, :64], v[:, :64])
                return scaled_dot_product_attention(q, k, v)
        else:
            tq, tk, tv = (torch.from_numpy(a).transpose(1, 2) for a in (q, k, v))
            sdpa = torch.nn.functional.scaled_dot_product_attention

            def run(small: bool = False):
                if small:
                    return sdpa(tq[:, :, :8], tk[:, :, :64], tv[:, :, :64], enable_gqa=True)
                return sdpa(tq, tk, tv, enable_gqa=True).transpose(1, 2)
    else:
        x = rng.standard_normal((128, 256, 96), dtype=np.float32)
        factor = 8 if impl.endswith("_f8") else None
        if impl.startswith("mha_cupy"):
            from mha_cupy import MultiHeadAttention

            layer = MultiHeadAttention(emsize=96, nhead=4, d_k=24, d_v=24, seed=0)
        else:
            from mha_cupy._reference import reference_layer

            layer = reference_layer(emsize=96, nhead=4, d_k=24, d_v=24, dtype="float32")
            x = torch.from_numpy(x)

        def run(small: bool = False):
            xi = x[:2].clone() if small and torch is not None else (x[:2].copy() if small else x)
            return layer(xi, add_input=True, allow_inplace=True, save_peak_mem_factor=factor if not small else None)

    run(small=True)
    rss0 = status("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    out = run()
    first = time.perf_counter() - t0
    growth = status("VmHWM") - rss0
    times = [first]
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    sample = np.asarray(out[0, :4] if not hasattr(out, "numpy") else out[0, :4].numpy(), dtype=np.float64)
    return {"case": case, "impl": impl, "peak_rss_growth_bytes": growth, "times_s": times,
            "median_s": statistics.median(times), "sample": sample.ravel()[:8].tolist()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child, args.repeats)))
        return 0

    rows = []
    for case in args.cases.split(","):
        for impl in CASES[case][1]:
            proc = subprocess.run([sys.executable, __file__, "--child", case, impl, "--repeats", str(args.repeats)],
                                  capture_output=True, text=True, check=False)
            if proc.returncode:
                print(proc.stderr, file=sys.stderr)
                raise SystemExit(f"{case}/{impl} failed")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{case:10s} {impl:12s} peak RSS growth {row['peak_rss_growth_bytes'] / 2**20:8.1f} MiB   "
                  f"median {row['median_s']:.3f} s  ({', '.join(f'{t:.3f}' for t in row['times_s'])})", flush=True)

    result = new_result(rows, cases={c: CASES[c][0] for c in args.cases.split(",")})
    lines = header("Memory and time: mha_cupy vs torch", result,
                   "method: one child process per row; peak RSS growth of one call over the RSS before it (VmHWM reset "
                   "via /proc/self/clear_refs after a warm-up call); time = median of the calls")
    for case in args.cases.split(","):
        lines += [f"## {case}: {CASES[case][0]}", "", "| impl | peak RSS growth (MiB) | median time (s) | ratio to first row |",
                  "|---|---|---|---|"]
        base = None
        for row in rows:
            if row["case"] != case:
                continue
            base = base or row
            lines.append(f"| {row['impl']} | {row['peak_rss_growth_bytes'] / 2**20:.1f} | {row['median_s']:.3f} | "
                         f"time x{row['median_s'] / base['median_s']:.2f}, memory x"
                         f"{row['peak_rss_growth_bytes'] / max(base['peak_rss_growth_bytes'], 1):.2f} |")
        lines.append("")
    write_result(result, "memory", args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
