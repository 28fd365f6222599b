"""The GPU campaign's benchmarks: ours on CuPy and on torch CUDA tensors beside torch and tabpfn on CUDA, one process.

Run by ``benchmarks/gpu/campaign.sh`` (part ``bench``); by hand, from the repository root:

    python benchmarks/gpu/bench_gpu.py [--dry-run] [--sections layer,sdpa,few_query] [--out FILE.json]

Sections (each row: time as the median of warm, synchronised calls, peak memory beyond the inputs, and the
scaled error of ours against the other side on the same inputs):

- ``layer``: tabpfn 2.2.1's ``MultiHeadAttention`` on CUDA against ours (same weights) on CuPy and on torch
  CUDA tensors at the shapes of ``benchmarks/bench_tabpfn.py`` (float32), and at one shape in float16 and
  bfloat16 where the library has the dtype (CuPy has no bfloat16);
- ``sdpa``: ``scaled_dot_product_attention`` against torch's SDPA (flash, memory-efficient and math kernels,
  each where it runs) at B=1, N=8, H=64, L = 4096 ... 131072, float32 and bfloat16, causal and not: seconds,
  TFLOP/s (4 B N L^2 H, halved when causal) and peak memory; the math kernel is skipped where its L x L scores
  would not fit;
- ``few_query``: 1, 64 and 1024 queries over 1,000,000 keys, 8 query heads on 1 KV head (H=64), int8 keys and
  values with one scale per batch row (TabPFN 9's quantized cache), against TabPFN 9's way: dequantize, then
  torch's SDPA with ``enable_gqa``.

Timing: ``cupy.cuda.Device.synchronize()`` and ``torch.cuda.synchronize()`` before and after each call, wall
clock between them. Peak memory: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``
for torch tensors; for CuPy, the default memory pool's ``total_bytes()`` after the call, its free blocks
released before (the pool keeps every block a call allocated, so that is the call's high-water mark), both
less what was in use before the call. ``--dry-run`` runs every section on the CPU with small sizes, NumPy
standing in for CuPy and torch CPU tensors for CUDA ones (plumbing only: no figure of it means anything).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable

os.environ.setdefault("SCIPY_ARRAY_API", "1")  # tabpfn 2.2.1's scikit-learn beside array-api-compat
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOL = {"float32": 1e-5, "float16": 2.0**-9, "bfloat16": 2.0**-6}


@dataclass
class Side:
    """Where one side runs: ``library`` is ours' ``xp`` name or ``"torch"``; ``device`` that library's device."""

    label: str
    library: str
    device: Any
    gpu: bool

    def sync(self) -> None:
        if not self.gpu:
            return
        if self.library == "cupy":
            import cupy

            cupy.cuda.Device().synchronize()
        else:
            import torch

            torch.cuda.synchronize()


def sides(dry_run: bool) -> dict[str, Side]:
    """ours on CuPy, ours on torch CUDA, and torch itself; on the CPU stand-ins with ``--dry-run``."""
    import torch

    if dry_run:
        cpu = torch.device("cpu")
        return {"cupy": Side("ours-numpy (stands in for CuPy)", "numpy", "cpu", False),
                "torch": Side("ours-torch-cpu (stands in for torch CUDA)", "torch", cpu, False),
                "theirs": Side("torch-cpu", "torch", cpu, False)}
    import cupy

    cuda = torch.device("cuda", 0)
    return {"cupy": Side("ours-cupy", "cupy", cupy.cuda.Device(0), True),
            "torch": Side("ours-torch-cuda", "torch", cuda, True),
            "theirs": Side("torch-cuda", "torch", cuda, True)}


# -- measuring ---------------------------------------------------------------------------------------------

def _mem_before(side: Side) -> int | None:
    if not side.gpu:
        return None
    if side.library == "cupy":
        import cupy

        pool = cupy.get_default_memory_pool()
        pool.free_all_blocks()
        return pool.used_bytes()
    import torch

    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _mem_after(side: Side, before: int | None) -> int | None:
    if before is None:
        return None
    if side.library == "cupy":
        import cupy

        return cupy.get_default_memory_pool().total_bytes() - before
    import torch

    return torch.cuda.max_memory_allocated() - before


def measure(side: Side, fn: Callable[[], Any], repeats: int) -> dict:
    """Median seconds of ``repeats`` synchronised calls after one warm-up, whose peak memory is the row's."""
    side.sync()
    before = _mem_before(side)
    fn()
    side.sync()
    peak = _mem_after(side, before)
    times = []
    for _ in range(repeats):
        side.sync()
        t0 = time.perf_counter()
        fn()
        side.sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "times_s": times, "peak_bytes": peak}


def scaled_error(actual: Any, reference: Any) -> float:
    """max |actual - reference| / max(1, max |reference|), in float64 on the host."""
    from mha_cupy.testing import scaled_error as _scaled

    return float(_scaled(actual, reference))


def _on(side: Side, a: Any, dtype: str | None = None) -> Any:
    """Host array ``a`` on ``side`` (cast to ``dtype`` there)."""
    from mha_cupy._backends import resolve_backend

    be = resolve_backend(side.library)
    x = be.from_numpy(a, side.device)
    return x if dtype is None else be.xp.astype(x, be.float_dtype(dtype))


def _row(section: str, case: str, side: Side, result: dict | None, **extra: Any) -> dict:
    return {"section": section, "case": case, "side": side.label, **(result or {}), **extra}


def _guard(rows: list[dict], section: str, case: str, side: Side, fn: Callable[[], dict]) -> None:
    """Run one measurement; a failure (out of memory, a bug) becomes a row with its error, not the end of the run."""
    try:
        row = fn()
    except Exception as exc:  # noqa: BLE001 - recorded and reported; the campaign goes on
        row = _row(section, case, side, None, error=f"{type(exc).__name__}: {exc}"[:500],
                   traceback=traceback.format_exc(limit=-3)[-1500:])
    rows.append(row)
    _print_row(row)
    _checkpoint(row)
    _free(side)


#: Where every row is written as soon as it is measured (``--out``), so that a part stopped at its time limit
#: still leaves what it measured.
_LIVE: dict[str, Any] = {"path": None, "result": None}


def _checkpoint(row: dict) -> None:
    result = _LIVE["result"]
    if result is None:
        return
    result["rows"].append(row)
    result["failed"] = sum(1 for r in result["rows"] if "error" in r or r.get("ok") is False)
    if _LIVE["path"]:
        _write(_LIVE["path"], result)


def _write(path: str, result: dict) -> None:
    """``result`` as JSON at ``path``, whole or not at all (a part stopped at its limit may be killed mid-write)."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def _free(side: Side) -> None:
    if not side.gpu:
        return
    import gc

    gc.collect()
    if side.library == "cupy":
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()
    else:
        import torch

        torch.cuda.empty_cache()


# -- section: tabpfn 2.2.1's layer ---------------------------------------------------------------------------

def section_layer(s: dict[str, Side], dry_run: bool, repeats: int) -> list[dict]:
    import numpy as np
    import torch
    from bench_tabpfn import CASES, TABPFN_SHAPES

    from mha_cupy._reference import reference_layer

    rows: list[dict] = []
    cases = [(name, "float32") for name in TABPFN_SHAPES] + [("item", "float16"), ("item", "bfloat16")]
    for name, dtype in cases:
        case = CASES[name]
        x_shape, kv_shape = case.x, case.x_kv
        if dry_run:  # the same layers, fewer rows
            x_shape = (*(min(n, 64) for n in x_shape[:-1]), x_shape[-1])
            kv_shape = None if kv_shape is None else (*(min(n, 128) for n in kv_shape[:-1]), kv_shape[-1])
        rng = np.random.default_rng(0)
        x = rng.standard_normal(x_shape, dtype=np.float32)
        x_kv = None if kv_shape is None else rng.standard_normal(kv_shape, dtype=np.float32)
        label = f"{name} {dtype} x{list(x_shape)}" + ("" if kv_shape is None else f" x_kv{list(kv_shape)}")
        ref = reference_layer(emsize=case.emsize, nhead=case.nhead, d_k=case.emsize // case.nhead,
                              d_v=case.emsize // case.nhead, dtype="float32", seed=0)
        ours = {key: _ours_layer(s[key], ref, dtype) for key in ("cupy", "torch")}  # before ref moves
        theirs = s["theirs"]
        ref = ref.to(device=theirs.device, dtype=getattr(torch, dtype))
        copy = case.kwargs.get("allow_inplace", False)
        t_x, t_kv = (None if a is None else _on(theirs, a, dtype) for a in (x, x_kv))

        def run_theirs(ref=ref, t_x=t_x, t_kv=t_kv, case=case, copy=copy):
            with torch.no_grad():
                return ref(t_x.clone() if copy else t_x, t_kv, **case.kwargs)

        expected = run_theirs()
        _guard(rows, "layer", label, theirs, lambda: _row("layer", label, theirs, measure(theirs, run_theirs, repeats)))
        for key, layer in ours.items():
            side = s[key]
            _guard(rows, "layer", label, side,
                   lambda side=side, layer=layer: _layer_ours(side, layer, x, x_kv, case, dtype, expected, label,
                                                              repeats))
        expected = t_x = t_kv = ours = None  # freed before the next case
        _free(theirs)
    return rows


def _ours_layer(side: Side, ref: Any, dtype: str) -> Any:
    """Our layer with ``ref``'s weights on ``side`` in ``dtype`` (rounded once from float32, as torch's ``.to``
    rounds tabpfn's), or None where the library has no such dtype."""
    from mha_cupy._backends import resolve_backend
    from mha_cupy._reference import layer_like

    if dtype not in resolve_backend(side.library).float_dtypes():
        return None
    return layer_like(ref, xp=side.library).to(side.library, device=side.device, dtype=dtype)


def _layer_ours(side: Side, layer: Any, x: Any, x_kv: Any, case: Any, dtype: str, expected: Any, label: str,
                repeats: int) -> dict:
    if layer is None:
        return _row("layer", label, side, None, skipped=f"{side.library} has no {dtype}")
    xp = layer.xp
    o_x, o_kv = (None if a is None else _on(side, a, dtype) for a in (x, x_kv))
    copy = case.kwargs.get("allow_inplace", False)

    def run() -> Any:
        return layer(xp.asarray(o_x, copy=True) if copy else o_x, o_kv, **case.kwargs)

    err = scaled_error(run(), expected)
    result = measure(side, run, repeats)
    return _row("layer", label, side, result, scaled_error=err, ok=err <= TOL[dtype], dtype=dtype)


# -- section: scaled_dot_product_attention against torch's SDPA ----------------------------------------------

def section_sdpa(s: dict[str, Side], dry_run: bool, repeats: int) -> list[dict]:
    import numpy as np
    import torch

    from mha_cupy import scaled_dot_product_attention

    rows: list[dict] = []
    B, N, H = 1, 8, 64
    lengths = (256, 512) if dry_run else (4096, 16384, 65536, 131072)
    theirs = s["theirs"]
    free = torch.cuda.mem_get_info()[0] if theirs.gpu else 8 * 2**30
    for L in lengths:
        rng = np.random.default_rng(L)
        q, k, v = (rng.standard_normal((B, L, N, H), dtype=np.float32) for _ in range(3))
        for dtype in ("float32", "bfloat16"):
            for causal in (False, True):
                flop = 4 * B * N * L * L * H / (2 if causal else 1)
                label = f"L={L} {dtype}{' causal' if causal else ''}"
                reps = repeats if L <= 16384 else 2 if L <= 65536 else 1  # ours takes seconds a call there
                tq, tk, tv = (_on(theirs, a, dtype).transpose(1, 2) for a in (q, k, v))
                expected = None
                for kernel in ("flash", "efficient", "math"):
                    if kernel == "flash" and dtype == "float32":
                        continue  # FlashAttention kernels take half precision only
                    if kernel == "math" and free // 2 < 3 * B * N * L * L * 4:
                        rows.append(_row("sdpa", label, theirs, None, kernel=kernel,
                                         skipped=f"L x L scores need {3 * B * N * L * L * 4 / 2**30:.0f} GiB"))
                        continue
                    if not theirs.gpu and kernel != "math":
                        continue  # the CPU stand-in has one kernel worth timing

                    def run_theirs(kernel=kernel, tq=tq, tk=tk, tv=tv, causal=causal):
                        from torch.nn.attention import SDPBackend, sdpa_kernel

                        chosen = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                                  "math": SDPBackend.MATH}[kernel]
                        with torch.no_grad(), sdpa_kernel([chosen]):
                            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

                    def timed(kernel=kernel, run_theirs=run_theirs):
                        nonlocal expected
                        out = run_theirs()
                        if expected is None:
                            expected = out.transpose(1, 2)
                        del out
                        r = measure(theirs, run_theirs, reps)
                        return _row("sdpa", label, theirs, r, kernel=kernel, tflops=flop / r["median_s"] / 1e12)

                    _guard(rows, "sdpa", label, theirs, timed)
                for key in ("cupy", "torch"):
                    side = s[key]

                    def ours(side=side, causal=causal, label=label, dtype=dtype, reps=reps, flop=flop):
                        from mha_cupy._backends import resolve_backend

                        if dtype not in resolve_backend(side.library).float_dtypes():
                            return _row("sdpa", label, side, None, skipped=f"{side.library} has no {dtype}")
                        oq, ok_, ov = (_on(side, a, dtype) for a in (q, k, v))

                        def run():
                            return scaled_dot_product_attention(oq, ok_, ov, is_causal=causal)

                        err = None if expected is None else scaled_error(run(), expected)
                        r = measure(side, run, reps)
                        return _row("sdpa", label, side, r, tflops=flop / r["median_s"] / 1e12, scaled_error=err,
                                    ok=None if err is None else err <= TOL[dtype])  # None: no torch kernel ran

                    _guard(rows, "sdpa", label, side, ours)
                tq = tk = tv = expected = None  # freed before the next length
                _free(theirs)
    return rows


# -- section: few queries over many int8 keys ------------------------------------------------------------

def section_few_query(s: dict[str, Side], dry_run: bool, repeats: int) -> list[dict]:
    import numpy as np
    import torch

    from mha_cupy import scaled_dot_product_attention

    rows: list[dict] = []
    S, N, K, H = (4_000 if dry_run else 1_000_000), 8, 1, 64
    rng = np.random.default_rng(5)
    k8, v8 = (rng.integers(-127, 128, (1, S, K, H), dtype=np.int8) for _ in range(2))
    scales = {"k_scale": np.array([0.02], np.float32), "v_scale": np.array([0.03], np.float32)}
    theirs = s["theirs"]
    tk8, tv8 = (torch.from_numpy(a).to(theirs.device).transpose(1, 2) for a in (k8, v8))
    tks, tvs = (torch.from_numpy(scales[n]).to(theirs.device) for n in ("k_scale", "v_scale"))
    for T in (1, 64, 256 if dry_run else 1024):
        q = rng.standard_normal((1, T, N, H), dtype=np.float32)
        tq = torch.from_numpy(q).to(theirs.device).transpose(1, 2)
        label = f"T={T} over S={S}, {N} heads on {K}, int8"

        def run_theirs(tq=tq):  # TabPFN 9: dequantize the cache entry, then torch's SDPA over grouped heads
            with torch.no_grad():
                k = tk8.to(torch.float32) * tks.view(-1, 1, 1, 1)
                v = tv8.to(torch.float32) * tvs.view(-1, 1, 1, 1)
                return torch.nn.functional.scaled_dot_product_attention(tq, k, v, enable_gqa=True)

        expected = run_theirs().transpose(1, 2)
        _guard(rows, "few_query", label, theirs,
               lambda: _row("few_query", label, theirs, measure(theirs, run_theirs, repeats), what="dequantize + SDPA"))
        for key in ("cupy", "torch"):
            side = s[key]

            def ours(side=side, q=q, label=label, expected=expected):
                oq = _on(side, q)
                ok8, ov8 = (_on(side, a) for a in (k8, v8))
                osc = {n: _on(side, a) for n, a in scales.items()}

                def run():
                    return scaled_dot_product_attention(oq, ok8, ov8, **osc)

                err = scaled_error(run(), expected)
                return _row("few_query", label, side, measure(side, run, repeats), scaled_error=err,
                            ok=err <= TOL["float32"])

            _guard(rows, "few_query", label, side, ours)
    return rows


SECTIONS = {"layer": section_layer, "sdpa": section_sdpa, "few_query": section_few_query}


def _versions() -> dict:
    from _common import versions

    v = versions()
    try:
        import cupy

        v["cupy"] = cupy.__version__
    except ImportError:
        pass
    return v


def _print_row(r: dict) -> None:
    if "median_s" not in r:
        print(f"  {r['section']:9s} {r['case']:40s} {r['side']:28s} {r.get('skipped') or r.get('error')}", flush=True)
        return
    extra = "" if r.get("scaled_error") is None else f" err {r['scaled_error']:.1e}{'' if r.get('ok') else ' FAIL'}"
    mem = "" if r.get("peak_bytes") is None else f" peak {r['peak_bytes'] / 2**20:.0f} MiB"
    tf = "" if r.get("tflops") is None else f" {r['tflops']:.1f} TFLOP/s"
    kernel = f" [{r['kernel']}]" if r.get("kernel") else ""
    print(f"  {r['section']:9s} {r['case']:40s} {r['side'] + kernel:28s} {r['median_s'] * 1e3:9.2f} ms{tf}{mem}{extra}",
          flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU stand-ins and small sizes (plumbing only)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per side (2 at L = 65536, 1 at 131072)")
    parser.add_argument("--out", default=None, help="write the rows and the machine as JSON here")
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}, expected names from {list(SECTIONS)}")
    s = sides(args.dry_run)
    from _common import machine

    result = {"dry_run": args.dry_run, "machine": machine(), "versions": _versions(),
              "sides": {k: v.label for k, v in s.items()},
              "complete": False, "rows": [], "failed": 0}
    _LIVE.update(path=args.out, result=result)
    for name in args.sections.split(","):
        start = time.perf_counter()
        print(f"{name}:", flush=True)
        SECTIONS[name](s, args.dry_run, args.repeats)
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
    result["complete"] = True
    if args.out:
        _write(args.out, result)
    print(f"bench: {len(result['rows'])} rows, {result['failed']} failed or off tolerance")
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
