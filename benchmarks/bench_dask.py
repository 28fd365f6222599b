"""Dask beside plain NumPy: the same attention call on 1 and 2 worker processes, and the overhead.

Run from the repository root (needs ``pip install ".[dask]"``):

    python benchmarks/bench_dask.py [--repeats 3] [--out benchmarks/results]

Cases: ``sdpa`` (q [8, 1024, 6, 32] over k/v [8, 32768, 6, 32], float32: the
test rows of 8 feature groups over a long context; chunks of 2 groups by 8192
keys) and ``layer`` (E=192, 6 heads: x [16, 1024, 192] in chunks of 4 rows).
For each: one plain NumPy call (our thread pool, 2 threads); then a
``LocalCluster`` of 1 and of 2 worker processes (one thread each) computing the
same lazy graph on inputs persisted on the workers first (the data is
where it would be after loading it with Dask; sending it is not timed). Times are medians of ``--repeats`` after
one warm-up; outputs are checked equal (``mha_cupy.compare``) first. Results go
to ``<out>/dask-<date>.json`` and ``.md`` with the machine, versions and command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import header, median_time, new_result, write_result


def _cases():
    import dask.array as da
    import numpy as np

    import mha_cupy

    rng = np.random.default_rng(0)
    q = rng.standard_normal((8, 1024, 6, 32), dtype=np.float32)
    k, v = (rng.standard_normal((8, 32768, 6, 32), dtype=np.float32) for _ in range(2))
    dq, dk, dv = da.from_array(q, chunks=(2, 1024, 6, 32)), *(da.from_array(a, chunks=(2, 8192, 6, 32)) for a in (k, v))
    layer = mha_cupy.MultiHeadAttention(emsize=192, nhead=6, d_k=32, d_v=32, dtype="float32", seed=0)
    lazy = layer.to("dask")
    x = rng.standard_normal((16, 1024, 192), dtype=np.float32)
    dx = da.from_array(x, chunks=(4, 1024, 192))
    sdpa = mha_cupy.scaled_dot_product_attention
    # name: (what, the NumPy call, the dask inputs, the lazy call on (persisted) dask inputs)
    return {
        "sdpa": ("q [8, 1024, 6, 32] over k/v [8, 32768, 6, 32]; chunks 2 x 8192 keys", lambda: sdpa(q, k, v),
                 [dq, dk, dv], lambda a: sdpa(*a)),
        "layer": ("layer E=192, 6 heads, x [16, 1024, 192]; chunks of 4 rows", lambda: layer(x), [dx],
                  lambda a: lazy(a[0])),
    }


def main() -> int:
    from dask.distributed import Client, LocalCluster, wait

    import mha_cupy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (default 3)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    rows = []
    for name, (what, eager, inputs, lazy) in _cases().items():
        row = {"case": name, "what": what, "numpy_s": median_time(eager, args.repeats)}
        row["tasks"] = len(lazy(inputs).__dask_graph__())
        for workers in (1, 2):
            with LocalCluster(n_workers=workers, threads_per_worker=1, host="127.0.0.1",
                              dashboard_address=None) as cluster, Client(cluster) as client:
                placed = client.persist(inputs)  # the data lives on the workers, as it would when loaded there
                wait(placed)
                row["scaled_error"] = mha_cupy.compare(client.compute(lazy(placed)).result(), eager()).scaled_error
                row[f"dask_{workers}w_s"] = median_time(lambda: client.compute(lazy(placed)).result(), args.repeats)
        row["overhead_2w"] = row["dask_2w_s"] / row["numpy_s"]
        row["speedup_1w_to_2w"] = row["dask_1w_s"] / row["dask_2w_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = new_result(rows)
    lines = header("mha_cupy on Dask beside plain NumPy", result,
                   "NumPy: one in-memory call (our pool, 2 threads); Dask: LocalCluster, worker processes with one "
                   "thread, inputs persisted on the workers before timing, medians") + [
        "| case | shape | tasks | NumPy (s) | Dask 1 worker (s) | Dask 2 workers (s) | 2 workers / NumPy | 1 → 2 workers "
        "| scaled error |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['what']} | {r['tasks']} | {r['numpy_s']:.3f} | {r['dask_1w_s']:.3f} | "
                     f"{r['dask_2w_s']:.3f} | {r['overhead_2w']:.2f} | ×{r['speedup_1w_to_2w']:.2f} | {r['scaled_error']:.1e} |")
    write_result(result, "dask", args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
