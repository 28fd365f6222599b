"""``mha-cupy bench``: our SDPA beside torch's, outputs checked first; time, peak memory, GFLOP/s, sweeps, a plot."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any
from collections.abc import Callable

from . import _memory
from ._report import EXIT_MISMATCH, EXIT_OK, CliError, Report, int_list, mib, progress, table

_CHILD = "from mha_cupy.cli._bench import child; child()"


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    from .._backends import BACKEND_NAMES
    from .._backends._dtypes import FLOAT_DTYPES

    p = sub.add_parser("bench", parents=parents, help="time our attention beside torch's SDPA (outputs checked first)",
                       description="Time scaled_dot_product_attention on --xp beside torch's SDPA on the CPU, on the "
                       "same random q [B, T, N, d], k/v [B, S, K, d]. The outputs are compared first (exit 1 and "
                       "nothing timed if they differ); then medians of interleaved calls, GFLOP/s (the dense "
                       "count 4*B*N*T*S*d, also for --causal) and, on CPU backends under Linux, the peak RSS growth "
                       "of one call after a tiny warm-up call, in a fresh process. Lists such as --q-len 1024,4096 "
                       "sweep.")
    p.add_argument("--xp", default="numpy", choices=BACKEND_NAMES, help="our backend (default numpy)")
    p.add_argument("--dtype", default="float32", choices=tuple(FLOAT_DTYPES),
                   help="of q, k, v and the output on both sides (default float32; bfloat16 where --xp has it: "
                   "torch, jax); outputs are compared within the dtype's tolerance")
    p.add_argument("--q-len", type=int_list, default=[4096], metavar="T[,T...]", help="query lengths (default 4096)")
    p.add_argument("--kv-len", type=int_list, default=None, metavar="S[,S...]",
                   help="key lengths: one for all, or one per --q-len (default: equal to each query length)")
    for names, default, what in ((("--batch",), 1, "batch size B"), (("--heads",), 6, "query heads N"),
                                 (("--head-dim", "--dim"), 32, "head size d"),
                                 (("--repeats",), 5, "timed calls of each side, after one warm-up")):
        p.add_argument(*names, dest=names[-1][2:].replace("-", "_"), type=int, default=default,
                       metavar=names[0][2:].replace("-", "_").upper(), help=f"{what} (default {default})")
    p.add_argument("--kv-heads", type=int, default=None, metavar="KV_HEADS",
                   help="key/value heads K, --heads a multiple of it (default: --heads)")
    p.add_argument("--causal", action="store_true", help="causal mask, aligned bottom-right as in our SDPA")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory measurement")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="plot time and memory against length (needs matplotlib: python -m pip install \".[plot]\")")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> Report:
    from .._validation import check_positive_int

    if args.plot:  # before any work: a missing matplotlib is one line now, not after the measurements
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise CliError('--plot needs matplotlib: python -m pip install ".[plot]"')
    pairs = _pairs(args)
    if args.kv_heads is None:
        args.kv_heads = args.heads
    for name in ("batch", "heads", "kv_heads", "dim", "repeats"):
        check_positive_int(getattr(args, name), "--head-dim" if name == "dim" else "--" + name.replace("_", "-"))
    if args.heads % args.kv_heads:
        msg = f"--heads must be a multiple of --kv-heads, got --heads {args.heads} --kv-heads {args.kv_heads}"
        raise CliError(msg)
    _check_dtype(args)
    torch = _torch()
    rows = []
    for T, S in progress(pairs, len(pairs), "bench"):
        row = _measure(args, T, S, torch)
        rows.append(row)
        if not row["agree"]:
            break
    data = {"config": _config(args), "torch": None if torch is None else torch.__version__, "rows": rows}
    if args.plot and all(r["agree"] for r in rows):
        from ._plot import plot

        data["plot"] = plot(rows, data["config"], args.plot)
    ok = all(r["agree"] for r in rows)
    return Report(EXIT_OK if ok else EXIT_MISMATCH, data, _text(data))


def _pairs(args: argparse.Namespace) -> list[tuple[int, int]]:
    qs, ks = args.q_len, args.kv_len
    if ks is None:
        return [(T, T) for T in qs]
    if len(ks) == 1 or len(qs) == 1:
        return [(T, S) for T in qs for S in ks]
    if len(ks) != len(qs):
        msg = f"--kv-len must give one length or one per --q-len ({len(qs)}), got {len(ks)}"
        raise CliError(msg)
    return list(zip(qs, ks))


def _check_dtype(args: argparse.Namespace) -> None:
    from .._backends import resolve_backend

    be = resolve_backend(args.xp)
    if args.dtype == "float64":
        be.enable_float64()  # a whole-process tool: JAX's jax_enable_x64, as --dtype float64 asks
    dtypes = be.float_dtypes()
    if args.dtype not in dtypes:
        msg = f"--dtype {args.dtype} needs a backend that has it, got --xp {args.xp} with {', '.join(sorted(dtypes))}"
        raise CliError(msg)


def _config(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in ("xp", "dtype", "batch", "heads", "kv_heads", "dim", "causal", "repeats")}


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


def _inputs(cfg: dict[str, Any], T: int, S: int) -> tuple[Any, tuple[Any, Any, Any]]:
    """--xp's namespace and q, k, v on it, drawn in float32 (float64 for --dtype float64): each side rounds them
    once to --dtype, so both get the same numbers (NumPy has no bfloat16 to carry them to torch)."""
    from .._backends import resolve_backend
    from .._random import uniform

    be = resolve_backend(cfg["xp"])
    if cfg["dtype"] == "float64":
        be.enable_float64()  # a whole-process tool: JAX's jax_enable_x64, as --dtype float64 asks
    xp = be.xp
    B, N, K, d = cfg["batch"], cfg["heads"], cfg["kv_heads"], cfg["dim"]
    drawn = getattr(xp, "float64" if cfg["dtype"] == "float64" else "float32")
    return xp, tuple(uniform(1, i, shape, drawn, xp=xp, device=None)
                     for i, shape in ((1, (B, T, N, d)), (2, (B, S, K, d)), (3, (B, S, K, d))))


def _callables(cfg: dict[str, Any], T: int, S: int, torch: Any) -> tuple[Callable, Callable | None]:
    """Our call (its output copied to the host) and torch's, on the same numbers."""
    from .._backends import to_numpy
    from ..attention import scaled_dot_product_attention

    xp, wide = _inputs(cfg, T, S)
    q, k, v = (xp.astype(a, getattr(xp, cfg["dtype"]), copy=False) for a in wide)

    def ours() -> Any:
        return to_numpy(scaled_dot_product_attention(q, k, v, is_causal=cfg["causal"]))

    if torch is None:
        return ours, None
    import warnings

    from torch.nn.attention.bias import causal_lower_right

    # Host copies of the wide draws, rounded by torch (JAX's arrays are read-only: copied).
    tq, tk, tv = (torch.from_numpy(to_numpy(a).copy()).to(getattr(torch, cfg["dtype"])).transpose(1, 2) for a in wide)
    # Our causal mask is aligned bottom-right; torch's is_causal is top-left, so give it the same mask.
    with warnings.catch_warnings():  # "NaNs when seq_len_q > seq_len_kv": so are ours, for rows that see no key
        warnings.simplefilter("ignore", UserWarning)
        mask = dict(attn_mask=causal_lower_right(T, S)) if cfg["causal"] and T != S else dict(is_causal=cfg["causal"])

    def theirs() -> Any:
        with torch.no_grad():  # a context, not a global switch: the caller's grad mode stays as it was
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True, **mask).transpose(1, 2)

    return ours, theirs


def _measure(args: argparse.Namespace, T: int, S: int, torch: Any) -> dict[str, Any]:
    from ..comparison import compare

    cfg = _config(args)
    ours, theirs = _callables(cfg, T, S, torch)
    row: dict[str, Any] = {"q_len": T, "kv_len": S, "agree": True, "comparison": None}
    if theirs is not None:
        c = compare(ours(), theirs())
        row.update(agree=c.ok, comparison=c.to_dict())
        if not c.ok:
            return row
    times = _interleaved([ours] if theirs is None else [ours, theirs], args.repeats)
    flops = 4 * args.batch * args.heads * T * S * args.dim
    for side, ts in zip(("ours", "torch"), times):
        row[f"{side}_s"] = statistics.median(ts)
        row[f"{side}_gflops"] = flops / row[f"{side}_s"] / 1e9
    row.update(_peaks(args, T, S, torch))
    return row


def _interleaved(fns: list[Callable], repeats: int) -> list[list[float]]:
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return times


def _peaks(args: argparse.Namespace, T: int, S: int, torch: Any) -> dict[str, Any]:
    from .._backends import resolve_backend

    be = resolve_backend(args.xp)
    if not (args.memory and _memory.supported() and be.is_cpu(be.default_device())):
        return {}
    sides = ["ours"] + ([] if torch is None else ["torch"])
    return {f"{s}_peak_bytes": _memory.in_child(_CHILD, {"cfg": _config(args), "T": T, "S": S, "side": s})["peak"]
            for s in sides}


def child() -> None:
    """In a fresh process: the peak RSS growth of one call of one side after a warm-up call on a tiny problem (JSON
    on stdin and stdout)."""
    job = json.loads(sys.stdin.read())
    torch, side = (_torch(), 1) if job["side"] == "torch" else (None, 0)
    call = _callables(job["cfg"], job["T"], job["S"], torch)[side]
    # Warm-up on a tiny problem: loading compiled kernels (numba's cache, torch's) is not the call's working set,
    # and no buffer of the real size is left for the measured call to reuse.
    _callables(job["cfg"], 8, 8, torch)[side]()
    print(json.dumps({"peak": _memory.peak_growth(call)}))


def _text(data: dict[str, Any]) -> str:
    cfg, rows = data["config"], data["rows"]
    head = (
        f"mha_cupy on {cfg['xp']} beside torch {data['torch'] or '(not installed)'} SDPA (CPU), {cfg['dtype']}, "
        f"B={cfg['batch']} N={cfg['heads']} K={cfg['kv_heads']} d={cfg['dim']}"
        + (", causal" if cfg["causal"] else "")
        + (f"; medians of {cfg['repeats']} interleaved calls" if cfg["repeats"] > 1 else "; one timed call each")
    )
    lines = [head]
    body = []
    for r in rows:
        if not r["agree"]:
            lines.append(f"T={r['q_len']} S={r['kv_len']}: outputs differ from torch's, nothing timed: "
                         f"scaled error {r['comparison']['scaled_error']:.2e} > {r['comparison']['tolerance']:.1e}")
            continue
        err = "-" if r["comparison"] is None else f"{r['comparison']['scaled_error']:.1e}"
        ratio = f"{r['ours_s'] / r['torch_s']:.2f}" if "torch_s" in r else "-"
        body.append([r["q_len"], r["kv_len"], f"{r['ours_s']:.4f}", f"{r.get('torch_s', float('nan')):.4f}", ratio,
                     f"{r['ours_gflops']:.1f}", f"{r.get('torch_gflops', float('nan')):.1f}",
                     mib(r.get("ours_peak_bytes")), mib(r.get("torch_peak_bytes")), err])
    if body:
        lines.append(table(["T", "S", "ours s", "torch s", "ours/torch", "ours GFLOP/s", "torch GFLOP/s",
                            "ours peak", "torch peak", "error"], body))
    if "plot" in data:
        lines.append(f"plot written to {data['plot']}")
    return "\n".join(lines)
