"""Why JAX compiles only one-tile calls as one program: time and peak memory of ``scaled_dot_product_attention``
on JAX (CPU) as shipped (one-tile calls ``jax.jit`` whole, chunked ones step by step) against every call compiled
whole, each case in a fresh process; and ``mha-cupy verify --xp jax`` as a whole.

Run from the repository root: ``python benchmarks/bench_jax_compile.py [--lengths 1024,8192] [--out
benchmarks/results]``. Nothing else may run on the machine meanwhile.

Self-attention B=1, 6 heads of 32, float32, the default memory budget (32 MiB: T = 1024 is one tile, T = 8192 is
chunked). Peak = growth of the process's peak RSS over the call (first call included), so it counts what XLA keeps
alive while the compiled program runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, new_result, write_result  # noqa: E402

CHILD = """
import json, resource, sys, time
import numpy as np
import jax.numpy as jnp
import mha_cupy._route as route
from mha_cupy import scaled_dot_product_attention as sdpa

mode, T = sys.argv[1], int(sys.argv[2])
if mode == "whole":  # every plan without dropout or lengths compiled as one program, chunked or not
    route.compiles_whole = lambda plan, sizes: plan.dropout_key is None and plan.q_lengths is None
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.standard_normal((1, T, 6, 32), dtype=np.float32)) for _ in range(3))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter(); sdpa(q, k, v).block_until_ready(); first = time.perf_counter() - t0
times = []
for _ in range(3):
    t0 = time.perf_counter(); sdpa(q, k, v).block_until_ready(); times.append(time.perf_counter() - t0)
peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
print(json.dumps({"first_s": round(first, 3), "median_s": round(sorted(times)[1], 4), "peak_bytes": peak}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="1024,8192")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    rows = []
    for T in (int(t) for t in args.lengths.split(",")):
        for mode in ("shipped", "whole"):
            run = subprocess.run([sys.executable, "-c", CHILD, mode, str(T)], capture_output=True, text=True, check=True)
            row = {"T": T, "mode": mode, **json.loads(run.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(row, flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mha_cupy", "verify", "--xp", "jax"], capture_output=True, check=True)
    verify_s = round(time.perf_counter() - t0, 1)
    print(f"mha-cupy verify --xp jax: {verify_s} s", flush=True)
    from importlib.metadata import version

    jax_version = f"jax {version('jax')}, jaxlib {version('jaxlib')}"
    result = new_result(rows, verify_jax_seconds=verify_s, jax=jax_version)
    lines = header("JAX: one program per call, or step by step", result,
                   jax_version, "peak = growth of peak RSS over the first and three more calls, in a fresh process",
                   f"`mha-cupy verify --xp jax` (the whole command, imports included): {verify_s} s")
    lines += ["| T = S | mode | first call s | median s | peak MiB |", "|---|---|---|---|---|"]
    lines += [f"| {r['T']} | {r['mode']} | {r['first_s']} | {r['median_s']} | {r['peak_bytes'] / 2**20:.0f} |"
              for r in rows]
    write_result(result, "jax-compile", args.out, lines)


if __name__ == "__main__":
    main()
