"""Do skipped key chunks pay? Sliding windows and variable-length batches against the same attention written
with an explicit boolean mask (what one had to do before ``local_window_size`` and ``kv_seq_lengths``), and
against full attention, on NumPy in one process.

Run from the repository root: ``python benchmarks/bench_options.py [--repeats 5] [--dispatch native|avx2]
[--out benchmarks/results]``. Nothing else may run on the machine meanwhile.

- window: B=1, L=16384, N=6 heads of 32 (TabPFN's sizes), ``local_window_size=256`` (keys within 256 positions
  either side), beside a ``[1, L, 1, L]`` band mask (256 MiB of booleans) and full attention;
- varlen: B=8 rows padded to 4096, with 512..4096 real keys and queries (uniform, seeded), ``q_seq_lengths`` and
  ``kv_seq_lengths`` beside a ``[B, L, 1, L]`` mask of the padding, and attention over the padded rows.

Each variant's output is checked against the masked one (float32 tolerance) before it is timed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_dispatch_argument, apply_dispatch, header, median_time, new_result, write_result  # noqa: E402


def cases():
    import numpy as np

    rng = np.random.default_rng(0)
    L, w = 16384, 256
    q, k, v = (rng.standard_normal((1, L, 6, 32), dtype=np.float32) for _ in range(3))
    t = np.arange(L)
    band = (np.abs(t[None, :] - t[:, None]) <= w)[None, :, None, :]
    yield "window", (q, k, v), {"local_window_size": w}, {"mask": band}, L
    B, L = 8, 4096
    q, k, v = (rng.standard_normal((B, L, 6, 32), dtype=np.float32) for _ in range(3))
    lengths = rng.integers(512, L + 1, B)
    mask = (t[:L][None, None, :] < lengths[:, None, None])[:, :, None, :] & (t[:L] < lengths[:, None])[:, :, None, None]
    yield "varlen", (q, k, v), {"q_seq_lengths": lengths, "kv_seq_lengths": lengths}, {"mask": mask}, L


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    add_dispatch_argument(parser)
    args = parser.parse_args()
    apply_dispatch(args.dispatch)
    from mha_cupy import scaled_dot_product_attention as sdpa
    from mha_cupy.testing import scaled_error

    rows = []
    for name, (q, k, v), option, masked, _ in cases():
        ref = sdpa(q, k, v, **masked)
        got = sdpa(q, k, v, **option)
        err = scaled_error(got, ref)
        assert err <= 1e-5, f"{name}: {err}"
        times = {"option": median_time(lambda: sdpa(q, k, v, **option), args.repeats),
                 "mask": median_time(lambda: sdpa(q, k, v, **masked), args.repeats),
                 "full": median_time(lambda: sdpa(q, k, v), args.repeats)}
        row = {"case": name, "shape": list(q.shape), "option": {k_: (v_.tolist() if hasattr(v_, "tolist") else v_)
                                                                  for k_, v_ in option.items()},
               "seconds": {k_: round(v_, 4) for k_, v_ in times.items()},
               "speedup_over_mask": round(times["mask"] / times["option"], 2),
               "speedup_over_full": round(times["full"] / times["option"], 2), "scaled_error_vs_mask": err}
        rows.append(row)
        print(row, flush=True)
    result = new_result(rows, dispatch=args.dispatch)
    lines = header("Skipped key chunks: windows and variable lengths against masks", result)
    lines += ["| case | shape | option s | mask s | full s | x over mask | x over full |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['shape']} | {r['seconds']['option']} | {r['seconds']['mask']} | "
              f"{r['seconds']['full']} | {r['speedup_over_mask']} | {r['speedup_over_full']} |" for r in rows]
    write_result(result, f"options-{args.dispatch}", args.out, lines)


if __name__ == "__main__":
    main()
