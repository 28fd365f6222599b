"""Our layer beside tabpfn 2.2.1's at the shapes TabPFN's transformer produces, in one process.

Run from the repository root (needs ``pip install ".[reference]"``):

    python benchmarks/bench_tabpfn.py [--repeats 7] [--cases feature,item,...] [--xp numpy] [--dispatch native|avx2]
                                      [--batch-invariant] [--out benchmarks/results]

Each case builds tabpfn's layer (float32, its own initialisation under
``torch.manual_seed``) and ours with the same weights, checks that the outputs
agree within the float32 tolerance, then times the two alternately
(``--repeats`` interleaved calls each, after one warm-up) and reports the ratio
of medians. Inputs that a call may overwrite (``allow_inplace``) are copied
before each timed call, outside the timing. Results go to
``<out>/tabpfn-<date>.json`` and ``.md`` with the machine, versions and command. With ``--batch-invariant`` a
third side is timed in the same rotation: ours with ``batch_invariant=True`` (its cost over our default and over
theirs).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# tabpfn 2.2.1 pins scikit-learn < 1.7, which needs SciPy's array API mode beside array-api-compat.
os.environ.setdefault("SCIPY_ARRAY_API", "1")

from _common import add_dispatch_argument, apply_dispatch, new_result, write_result  # noqa: E402


@dataclass(frozen=True)
class Case:
    """One layer call: the layer's shape, its inputs' shapes and the call's keywords."""

    what: str
    x: tuple[int, ...]
    emsize: int = 192
    nhead: int = 6
    x_kv: tuple[int, ...] | None = None
    kwargs: dict = field(default_factory=dict)
    kind: str = "layer"  # or "sdpa": q/k/v shapes in x, x_kv (k and v alike), against torch's SDPA


_INPLACE = dict(add_input=True, allow_inplace=True)
CASES = {
    "feature": Case("feature attention, x [2000, 12, 192]", (2000, 12, 192)),
    "item": Case("item attention, x [24, 1024, 192]", (24, 1024, 192)),
    "item_f4": Case("item attention with save_peak_mem_factor=4 (add_input, allow_inplace)", (24, 1024, 192),
                    kwargs=dict(save_peak_mem_factor=4, **_INPLACE)),
    "e96_f8": Case("x [128, 256, 96], 4 heads, save_peak_mem_factor=8 (add_input, allow_inplace)", (128, 256, 96),
                   emsize=96, nhead=4, kwargs=dict(save_peak_mem_factor=8, **_INPLACE)),
    "test_rows": Case("512 test rows over 4096 train rows, 8 feature groups, reuse_first_head_kv", (8, 512, 192),
                      x_kv=(8, 4096, 192), kwargs=dict(reuse_first_head_kv=True)),
    "long": Case("one long sequence, x [1, 8192, 192]", (1, 8192, 192)),
    "few_query": Case("few queries: q [1, 8, 8, 64] over k/v [1, 262144, 1, 64] (SDPA)", (1, 8, 8, 64),
                      x_kv=(1, 262144, 1, 64), kind="sdpa"),
    "long_sdpa": Case("long case: B=1, H=6, L=16384, d=32 (SDPA, default arguments)", (1, 16384, 6, 32),
                      x_kv=(1, 16384, 6, 32), kind="sdpa"),
}
#: The shapes of the speed issue's table; the geometric mean is taken over them.
TABPFN_SHAPES = ("feature", "item", "item_f4", "e96_f8", "test_rows", "long")


def _layer_pair(case: Case, xp: str, rng):
    import numpy as np
    import torch

    from mha_cupy._backends import resolve_backend
    from mha_cupy._reference import layer_like, reference_layer

    ref = reference_layer(emsize=case.emsize, nhead=case.nhead, d_k=case.emsize // case.nhead,
                          d_v=case.emsize // case.nhead, dtype="float32", seed=0)
    ours = layer_like(ref, xp=xp)
    be = resolve_backend(xp)
    x = rng.standard_normal(case.x, dtype=np.float32)
    x_kv = None if case.x_kv is None else rng.standard_normal(case.x_kv, dtype=np.float32)
    ours_x, ours_kv = be.from_numpy(x, ours.device), None if x_kv is None else be.from_numpy(x_kv, ours.device)
    t_x, t_kv = torch.from_numpy(x), None if x_kv is None else torch.from_numpy(x_kv)
    copy = case.kwargs.get("allow_inplace", False)

    def run_ours(**more):
        return ours(be.xp.asarray(ours_x, copy=True) if copy else ours_x, ours_kv, **case.kwargs, **more)

    def run_theirs():
        return ref(t_x.clone() if copy else t_x, t_kv, **case.kwargs)

    return run_ours, run_theirs


def _sdpa_pair(case: Case, xp: str, rng):
    import numpy as np
    import torch

    from mha_cupy import scaled_dot_product_attention
    from mha_cupy._backends import resolve_backend

    be = resolve_backend(xp)
    q = rng.standard_normal(case.x, dtype=np.float32)
    k, v = (rng.standard_normal(case.x_kv, dtype=np.float32) for _ in range(2))
    ours_qkv = [be.from_numpy(a, be.default_device()) for a in (q, k, v)]
    tq, tk, tv = (torch.from_numpy(a).transpose(1, 2) for a in (q, k, v))

    def run_ours(**more):
        return scaled_dot_product_attention(*ours_qkv, **more)

    def run_theirs():
        return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True).transpose(1, 2)

    return run_ours, run_theirs


def measure(name: str, case: Case, xp: str, repeats: int, invariant: bool = False) -> dict:
    import numpy as np
    import torch

    from mha_cupy._backends import to_numpy
    from mha_cupy.testing import scaled_error

    torch.set_grad_enabled(False)
    rng = np.random.default_rng(0)
    run_ours, run_theirs = (_layer_pair if case.kind == "layer" else _sdpa_pair)(case, xp, rng)
    expected = run_theirs().numpy()
    sides = {"ours": run_ours, "theirs": run_theirs}
    if invariant:
        sides["invariant"] = lambda: run_ours(batch_invariant=True)
    errors = {side: scaled_error(to_numpy(fn()), expected) for side, fn in sides.items() if side != "theirs"}
    if not all(e <= 1e-5 for e in errors.values()):  # the calls above are the warm-up too
        raise SystemExit(f"{name}: outputs differ, scaled errors {errors} > 1e-5; nothing timed")
    times: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(repeats):
        for side, fn in sides.items():
            t0 = time.perf_counter()
            fn()
            times[side].append(time.perf_counter() - t0)
    med = {side: statistics.median(t) for side, t in times.items()}
    row = {"case": name, "what": case.what, "scaled_error": errors["ours"], "ours_s": times["ours"],
           "theirs_s": times["theirs"], "ours_median_s": med["ours"], "theirs_median_s": med["theirs"],
           "ratio": med["ours"] / med["theirs"]}
    if invariant:
        row.update(invariant_s=times["invariant"], invariant_median_s=med["invariant"],
                   invariant_scaled_error=errors["invariant"], invariant_over_ours=med["invariant"] / med["ours"],
                   invariant_over_theirs=med["invariant"] / med["theirs"])
    return row


def _markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [f"# mha_cupy vs tabpfn 2.2.1 at TabPFN's shapes, {result['dispatch']} dispatch ({result['date']})", "",
             f"- command: `{result['command']}`", f"- machine: {result['machine']}",
             f"- versions: {result['versions']}", f"- ours on `{result['xp']}`, theirs on torch (CPU), float32; "
             "interleaved calls, medians; outputs checked equal first (scaled error)", "",
             "| case | shape | ours (s) | tabpfn/torch (s) | ours / theirs | scaled error |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['what']} | {r['ours_median_s']:.4f} | {r['theirs_median_s']:.4f} | "
                     f"{r['ratio']:.2f} | {r['scaled_error']:.1e} |")
    if rows and "invariant_median_s" in rows[0]:
        lines += ["", "With `batch_invariant=True` (timed in the same rotation):", "",
                  "| case | invariant (s) | invariant / ours default | invariant / theirs | scaled error |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['invariant_median_s']:.4f} | {r['invariant_over_ours']:.2f} | "
                  f"{r['invariant_over_theirs']:.2f} | {r['invariant_scaled_error']:.1e} |" for r in rows]
    if result.get("geomean") is not None:
        lines += ["", f"Geometric mean of ours / theirs over {', '.join(TABPFN_SHAPES)}: **{result['geomean']:.2f}**"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed calls of each side (default 7)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--xp", default="numpy", help="our backend (default numpy)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--batch-invariant", action="store_true",
                        help="also time ours with batch_invariant=True, in the same rotation")
    add_dispatch_argument(parser)
    args = parser.parse_args()
    apply_dispatch(args.dispatch)
    rows = []
    for name in args.cases.split(","):
        row = measure(name, CASES[name], args.xp, args.repeats, args.batch_invariant)
        rows.append(row)
        extra = f"  invariant x{row['invariant_over_ours']:.2f}" if args.batch_invariant else ""
        print(f"{name:10s} ours {row['ours_median_s']:.4f} s  theirs {row['theirs_median_s']:.4f} s  "
              f"ratio {row['ratio']:.2f}  (error {row['scaled_error']:.1e}){extra}", flush=True)
    ratios = [r["ratio"] for r in rows if r["case"] in TABPFN_SHAPES]
    geomean = math.exp(sum(map(math.log, ratios)) / len(ratios)) if len(ratios) == len(TABPFN_SHAPES) else None
    result = new_result(rows, xp=args.xp, geomean=geomean, dispatch=args.dispatch)
    write_result(result, f"tabpfn-{args.dispatch}", args.out, _markdown(result).splitlines())
    if geomean is not None:
        print(f"geometric mean {geomean:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
