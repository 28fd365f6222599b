"""TabPFN 9 with mha_cupy as its attention backend, beside TabPFN's own attention: a cached predict over an int8
KV cache, timed and its peak memory growth measured, in one process.

The model is TabPFN-3's default configuration (24 ICL layers, 8 heads of 64) with TabPFN's own random
initialisation, fitted on random data with ``PerformanceOptions(kv_cache_dtype=torch.int8)``. For each number of
training rows and test rows, the predict (``x_is_test_only=True`` from the cache) runs under TabPFN's own path,
``register(policy="auto")`` and ``register(policy="all")``, interleaved, ``--repeats`` times each after one warm-up
call: the median time, and the peak resident memory growth of the call (Linux: ``/proc/self/clear_refs`` resets
the peak, ``VmHWM`` reads it) over the memory before it (glibc told to map blocks of 128 KiB or more
directly and to trim its heap before each call, so that pages freed earlier do not hide the growth). ``dense_copy_mib`` is the dense float32 copy of one
layer's keys and values that TabPFN's own path makes from an int8 entry (``QuantizedKVCacheEntry.dequantize``).

Training rows beyond ``--fit-rows`` (default 20,000) are not fitted: the fitted cache is repeated along the
training rows (keys, values, their int8 entries and the decoder's keys) up to the size asked for, which gives
the predict the shapes, dtypes and memory of a real cache of that size (fitting 100,000 rows would take about an
hour and a half on 2 cores; predictions from a repeated cache are not those of a fit on repeated rows).

Needs tabpfn 9 (``pip install "tabpfn==9.2.0" ".[fast]"``). Run:
``python benchmarks/bench_tabpfn_backend.py [--train 20000 100000] [--test 1 64 1024] [--dispatch avx2]``;
``--quick`` for a small model in seconds. Nothing else may run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_dispatch_argument, apply_dispatch, machine, versions  # noqa: E402

MODES = ("tabpfn", "auto", "all")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _glibc():
    """glibc, told to serve every block of 128 KiB or more by mmap (returned to the system when freed), so that
    memory freed by the fit does not hide a call's growth; None elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD, fixed (no dynamic raise after frees)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _glibc()


def measure(call) -> tuple[float, float]:
    """Seconds and peak resident memory growth (MiB) of ``call()``."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)  # free heap pages back to the system: the growth below is new pages
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the current RSS
    before = _rss_kib("VmRSS")
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    return seconds, (_rss_kib("VmHWM") - before) / 1024


def repeat_cache(cache, y, times: int):
    """The cache and labels of ``times`` copies of the training rows (see the module docstring)."""
    import torch
    from tabpfn.architectures.kv_cache import KVCacheEntry, QuantizedKVCacheEntry

    def rows(t):
        return None if t is None else t.repeat(1, times, *([1] * (t.dim() - 2)))

    kv = {}
    for i, e in cache.kv.items():
        if isinstance(e, QuantizedKVCacheEntry):
            kv[i] = QuantizedKVCacheEntry(key=rows(e.key), value=rows(e.value), key_scale=e.key_scale,
                                          value_scale=e.value_scale)
        else:
            kv[i] = KVCacheEntry(key=rows(e.key), value=rows(e.value))
    b, n = cache.train_shape
    bigger = type(cache)(kv=kv, decoder_keys=rows(cache.decoder_keys), train_shape=(b, n * times),
                         scaler_cache=cache.scaler_cache, inducing_hidden=cache.inducing_hidden)
    return bigger, torch.cat([y] * times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--test", type=int, nargs="+", default=[1, 64, 1024])
    parser.add_argument("--fit-rows", type=int, default=20_000, help="training rows actually fitted")
    parser.add_argument("--features", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="4 layers, 2,000 training rows, 1 and 64 test rows")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/...)")
    add_dispatch_argument(parser)
    args = parser.parse_args()
    apply_dispatch(args.dispatch)

    import torch
    from tabpfn.architectures import tabpfn_v3
    from tabpfn.architectures.interface import PerformanceOptions
    from tabpfn.architectures.shared.attention_backends import recorded_attention_backends

    import mha_cupy.tabpfn

    config = {"max_num_classes": 10}
    if args.quick:
        config["nlayers"] = 4
        args.train, args.fit_rows, args.test, args.repeats = [2_000, 4_000], 2_000, [1, 64], 2
    torch.manual_seed(0)
    model = tabpfn_v3.get_architecture(tabpfn_v3.TabPFNV3Config(**config)).eval()
    gen = torch.Generator().manual_seed(0)
    x_fit = torch.randn(args.fit_rows, 1, args.features, generator=gen)
    y_fit = torch.randint(0, 3, (args.fit_rows,), generator=gen).float()
    with torch.no_grad():
        start = time.perf_counter()
        _, fitted = model(x_fit, y_fit, return_kv_cache=True,
                          performance_options=PerformanceOptions(kv_cache_dtype=torch.int8))
        fit_s = time.perf_counter() - start
    print(f"fitted {args.fit_rows} rows in {fit_s:.0f} s", flush=True)

    rows = []
    for n_train in args.train:
        times = -(-n_train // args.fit_rows)
        cache, y = (fitted, y_fit) if times == 1 else repeat_cache(fitted, y_fit, times)
        entry = cache.kv[0]
        dense_copy = 2 * entry.key.numel() * 4 / 2**20
        for n_test in args.test:
            x_test = torch.randn(n_test, 1, args.features, generator=gen)
            results = {m: {"s": [], "mib": []} for m in MODES}
            outputs = {}
            for r in range(args.repeats + 1):
                for mode in MODES:
                    if mode != "tabpfn":
                        mha_cupy.tabpfn.register(policy=mode)
                    try:
                        with torch.no_grad(), recorded_attention_backends() as calls:
                            seconds, mib = measure(lambda: outputs.__setitem__(
                                mode, model(x_test, y, kv_cache=cache, x_is_test_only=True)))
                    finally:
                        mha_cupy.tabpfn.unregister()
                    if r:  # the first round warms up (numba's kernels load, allocator pools fill)
                        results[mode]["s"].append(seconds)
                        results[mode]["mib"].append(mib)
                    results[mode]["ours"] = sum(c is not None for c in calls)
                    results[mode]["calls"] = len(calls)
            ref = outputs["tabpfn"].double()
            row = {"train_rows": n_train, "fitted_rows": min(n_train, args.fit_rows), "test_rows": n_test,
                   "dense_copy_mib": round(dense_copy, 1)}
            for mode in MODES:
                res = results[mode]
                row[mode] = {"median_s": round(statistics.median(res["s"]), 4), "times_s": [round(s, 4) for s in res["s"]],
                             "peak_growth_mib": round(statistics.median(res["mib"]), 1),
                             "calls_ours": res["ours"], "calls": res["calls"],
                             "scaled_error": float((outputs[mode].double() - ref).abs().max() / max(1.0, float(ref.abs().max())))}
                if mode != "tabpfn":
                    row[mode]["time_ratio"] = round(row[mode]["median_s"] / row["tabpfn"]["median_s"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)

    stamp = dt.datetime.now().strftime("%Y-%m-%dT%H%M")
    out = args.out or Path(__file__).resolve().parent / "results" / f"tabpfn-backend-{args.dispatch}-{stamp}.json"
    if not args.quick or args.out:
        out.write_text(json.dumps({
            "benchmark": "bench_tabpfn_backend", "date": stamp, "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": machine(), "versions": versions(), "auto_rule": mha_cupy.tabpfn.AUTO_RULE,
            "model": {"config": config, "features": args.features, "fit_rows": args.fit_rows, "fit_s": round(fit_s, 1)},
            "rows": rows}, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
