"""The ``mha-cupy`` command line: verify fixtures, compare backends.

``mha-cupy verify [--fixtures DIR] [--xp NAME]``
    Replay every reference fixture (by default those installed with the package) on a backend;
    exit 1 on any mismatch.
``mha-cupy compare --xp NAME [--other NAME] [--dtype float32]``
    Run one random layer on two backends and print the scaled difference.
``mha-cupy bench [--xp NAME] [--q-len 4096 ...]``
    Time ``scaled_dot_product_attention`` beside torch's SDPA in this process
    (medians of ``--repeats`` calls). Figures to keep belong in
    ``benchmarks/results/`` (``python benchmarks/bench_memory.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ._backends import BACKEND_NAMES, BackendUnavailableError, convert, resolve_backend, to_numpy
from ._validation import check_positive_int
from .testing import scaled_error, tolerance


def _verify(args: argparse.Namespace) -> int:
    from ._reference import packaged_fixtures, verify_fixtures

    directory = packaged_fixtures() if args.fixtures is None else Path(args.fixtures)
    if not (directory / "manifest.json").is_file():
        print(f"no manifest.json in {directory}; pass --fixtures DIR, or leave it out for the fixtures installed "
              "with mha_cupy", file=sys.stderr)
        return 2

    rows = verify_fixtures(directory, xp=args.xp)
    width = max(len(f"{r['case_id']}:{r['key']}") for r in rows)
    for r in rows:
        mark = "ok" if r["ok"] else "FAIL"
        print(f"{r['case_id'] + ':' + r['key']:<{width}}  {r['dtype']:<8} {r['error']:.2e} <= {r['tolerance']:.0e}  {mark}")
    failed = sum(not r["ok"] for r in rows)
    print(f"{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


def _compare(args: argparse.Namespace) -> int:
    from .dropout import uniform
    from .module import MultiHeadAttention

    for name in ("emsize", "nhead", "batch", "length"):
        check_positive_int(getattr(args, name), f"--{name}")
    a = MultiHeadAttention(emsize=args.emsize, nhead=args.nhead, d_k=args.emsize // args.nhead,
                           d_v=args.emsize // args.nhead, dtype=args.dtype, xp=args.other, seed=args.seed)
    b = a.to(args.xp)
    x = uniform(args.seed, 99, (args.batch, args.length, args.emsize), a.dtype, xp=a.xp, device=a.device) - 0.5
    ya = a(x)
    yb = b(convert(x, resolve_backend(b.xp)))
    err = scaled_error(to_numpy(yb), to_numpy(ya))
    tol = tolerance(args.dtype)
    print(f"{args.xp} vs {args.other}, {args.dtype}, x {tuple(x.shape)}: scaled max error {err:.2e} (tolerance {tol:.0e})")
    return 0 if err <= tol else 1


def _bench(args: argparse.Namespace) -> int:
    import statistics
    import time

    from .attention import scaled_dot_product_attention
    from .dropout import uniform

    for name in ("batch", "q_len", "kv_len", "heads", "dim", "repeats"):
        check_positive_int(getattr(args, name), "--" + name.replace("_", "-"))
    B, T, S, N, K, H = args.batch, args.q_len, args.kv_len, args.heads, args.kv_heads, args.dim
    if K < 1 or N % K:
        print(f"mha-cupy bench: --heads must be a multiple of --kv-heads, got --heads {N} --kv-heads {K}", file=sys.stderr)
        return 2
    xp = resolve_backend(args.xp).xp
    dtype = getattr(xp, args.dtype)
    q, k, v = (uniform(1, i, shape, dtype, xp=xp, device=None)
               for i, shape in ((1, (B, T, N, H)), (2, (B, S, K, H)), (3, (B, S, K, H))))

    def median_time(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def ours_fn():
        return to_numpy(scaled_dot_product_attention(q, k, v, is_causal=args.causal))

    try:
        import torch
        from torch.nn.attention.bias import causal_lower_right
    except ImportError:
        print(f"mha_cupy ({args.xp}) B={B} T={T} S={S} N={N} K={K} d={H} {args.dtype}: median {median_time(ours_fn):.4f} s")
        print("torch is not installed: no side-by-side figure")
        return 0
    tq, tk, tv = (torch.from_numpy(to_numpy(a)).transpose(1, 2) for a in (q, k, v))
    # Our causal mask is aligned bottom-right; torch's is_causal is top-left, so give it the same mask.
    causal = dict(attn_mask=causal_lower_right(T, S)) if args.causal and T != S else dict(is_causal=args.causal)

    def theirs_fn():
        with torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True, **causal)

    err = scaled_error(ours_fn(), theirs_fn().transpose(1, 2).numpy())
    if not err <= tolerance(args.dtype):
        print(f"mha-cupy bench: outputs differ from torch's (scaled error {err:.2e}); nothing timed", file=sys.stderr)
        return 1
    ours, theirs = median_time(ours_fn), median_time(theirs_fn)
    print(f"mha_cupy ({args.xp}) B={B} T={T} S={S} N={N} K={K} d={H} {args.dtype}: median {ours:.4f} s "
          f"(outputs agree with torch's: scaled error {err:.1e})")
    print(f"torch {torch.__version__} SDPA (CPU): median {theirs:.4f} s; mha_cupy / torch = {ours / theirs:.2f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(prog="mha-cupy", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mha-cupy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("verify", help="replay the tabpfn reference fixtures")
    p.add_argument("--fixtures", default=None,
                   help="folder holding manifest.json (default: the fixtures installed with mha_cupy)")
    p.add_argument("--xp", default="numpy", choices=BACKEND_NAMES)
    p.set_defaults(run=_verify)
    c = sub.add_parser("compare", help="the same random layer on two backends")
    c.add_argument("--xp", required=True, choices=BACKEND_NAMES)
    c.add_argument("--other", default="numpy", choices=BACKEND_NAMES)
    c.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    c.add_argument("--emsize", type=int, default=64)
    c.add_argument("--nhead", type=int, default=4)
    c.add_argument("--batch", type=int, default=2)
    c.add_argument("--length", type=int, default=128)
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(run=_compare)
    b = sub.add_parser("bench", help="time the core beside torch's SDPA")
    b.add_argument("--xp", default="numpy", choices=BACKEND_NAMES)
    b.add_argument("--dtype", default="float32", choices=["float64", "float32"])
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--q-len", type=int, default=4096)
    b.add_argument("--kv-len", type=int, default=4096)
    b.add_argument("--heads", type=int, default=6)
    b.add_argument("--kv-heads", type=int, default=6)
    b.add_argument("--dim", type=int, default=32)
    b.add_argument("--causal", action="store_true")
    b.add_argument("--repeats", type=int, default=5)
    b.set_defaults(run=_bench)
    args = parser.parse_args(argv)
    try:
        for name in {args.xp, getattr(args, "other", args.xp)}:
            resolve_backend(name).enable_float64()  # the fixtures and comparisons include float64
    except BackendUnavailableError as exc:
        print(f"mha-cupy: {exc}", file=sys.stderr)
        return 2
    try:
        return args.run(args)
    except (ValueError, TypeError) as exc:  # a bad option value reaching the library: one line, not a traceback
        print(f"mha-cupy {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
