"""Backward passes beside torch autograd: time (interleaved, one process) and peak memory (fresh processes).

Run from the repository root (needs ``pip install ".[reference]"``):

    python benchmarks/bench_backward.py [--repeats 5] [--cases long,item,feature] [--out benchmarks/results]

Each side computes a forward and its backward, as training does:
``scaled_dot_product_attention_vjp`` / ``MultiHeadAttention.vjp`` (the forward
once, then score tiles recomputed from its log-sum-exp) against torch's SDPA or
tabpfn 2.2.1's layer under autograd (float32, same inputs, gradients checked
equal first). Peak memory is the RSS growth of one forward+backward in a fresh
process (``mha_cupy.cli._memory``), inputs made before the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("SCIPY_ARRAY_API", "1")  # tabpfn 2.2.1's scikit-learn pin, beside array-api-compat

from _common import header, new_result, write_result  # noqa: E402

CASES = {
    "long": "SDPA B=1, L=8192, 6 heads, d=32",
    "item": "layer E=192, 6 heads, item attention x [24, 1024, 192]",
    "feature": "layer E=192, 6 heads, feature attention x [2000, 12, 192]",
}
_CHILD = "import sys; sys.path.insert(0, 'benchmarks'); from bench_backward import child; child()"


def sides(case: str):
    """``(ours, theirs)``: functions running one forward+backward and returning the input gradient(s)."""
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    if case == "long":
        import mha_cupy

        q, k, v, d = (rng.standard_normal((1, 8192, 6, 32), dtype=np.float32) for _ in range(4))
        tq, tk, tv = (torch.tensor(a).transpose(1, 2).requires_grad_(True) for a in (q, k, v))
        td = torch.tensor(d).transpose(1, 2)

        def theirs():
            tq.grad = tk.grad = tv.grad = None
            torch.nn.functional.scaled_dot_product_attention(tq, tk, tv).backward(td)
            return tq.grad.transpose(1, 2)

        return (lambda: mha_cupy.scaled_dot_product_attention_vjp(q, k, v, d)[0]), theirs
    from mha_cupy._reference import layer_like, reference_layer

    ref = reference_layer(emsize=192, nhead=6, d_k=32, d_v=32, dtype="float32", seed=0)
    ours = layer_like(ref, xp="numpy")
    shape = (24, 1024, 192) if case == "item" else (2000, 12, 192)
    x, d = (rng.standard_normal(shape, dtype=np.float32) for _ in range(2))
    tx, td = torch.tensor(x).requires_grad_(True), torch.tensor(d)

    def theirs():
        tx.grad = None
        ref.zero_grad(set_to_none=True)
        ref(tx).backward(td)
        return tx.grad

    return (lambda: ours.vjp(x, d)[0]), theirs


def child() -> None:
    from mha_cupy.cli import _memory

    job = json.loads(sys.stdin.read())
    ours, theirs = sides(job["case"])
    fn = ours if job["side"] == "ours" else theirs
    fn()  # warm-up (thread pools, torch's first-call allocations)
    print(json.dumps({"peak": _memory.peak_growth(fn)}))


def measure(case: str, repeats: int) -> dict:
    import numpy as np

    from mha_cupy import compare
    from mha_cupy.cli import _memory

    ours, theirs = sides(case)
    err = compare(ours(), theirs().detach().numpy().astype(np.float32), rtol=1e-4).scaled_error
    times = {"ours": [], "theirs": []}
    for _ in range(repeats):
        for name, fn in (("ours", ours), ("theirs", theirs)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    row = {"case": case, "what": CASES[case], "scaled_error_dx": err,
           **{f"{k}_s": statistics.median(v) for k, v in times.items()}}
    row["ratio"] = row["ours_s"] / row["theirs_s"]
    for side in ("ours", "theirs"):
        row[f"{side}_peak_mib"] = _memory.in_child(_CHILD, {"case": case, "side": side})["peak"] / 2**20
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed forward+backward passes of each side (default 5)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    rows = []
    for case in args.cases.split(","):
        rows.append(measure(case, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    result = new_result(rows)
    lines = header("Forward+backward, mha_cupy vs torch autograd", result,
                   "float32; time: medians of interleaved runs in one process; peak: RSS growth of one "
                   "forward+backward in a fresh process; dx checked against theirs first (scaled error)") + [
        "| case | shape | ours (s) | torch (s) | ours / torch | ours peak (MiB) | torch peak (MiB) | dx error |",
        "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['what']} | {r['ours_s']:.3f} | {r['theirs_s']:.3f} | {r['ratio']:.2f} | "
                     f"{r['ours_peak_mib']:.1f} | {r['theirs_peak_mib']:.1f} | {r['scaled_error_dx']:.1e} |")
    write_result(result, "backward", args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
