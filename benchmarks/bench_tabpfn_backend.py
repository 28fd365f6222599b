"""TabPFN 9 with mha_cupy as its attention backend, beside TabPFN's own attention: a cached predict over an int8
KV cache, timed and its peak memory growth measured, in one process.

The model is TabPFN-3's default configuration (24 ICL layers, 8 heads of 64) with TabPFN's own random
initialisation, fitted on random data with ``PerformanceOptions(kv_cache_dtype=torch.int8)``. For each number of
training rows and test rows, the predict (``x_is_test_only=True`` from the cache) runs under TabPFN's own path,
``register(policy="auto")`` and ``register(policy="all")``, interleaved, ``--repeats`` times each after one warm-up
call: the median time. Then, in a second pass (glibc told to map blocks of 128 KiB or more directly and to trim
its heap before each call, so that pages freed earlier do not hide the growth; this would distort the times),
the peak resident memory growth of the call over the memory before it (Linux: ``/proc/self/clear_refs`` resets
the peak, ``VmHWM`` reads it), the median of two. ``dense_copy_mib`` is the dense float32 copy of one
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


def hold_freed_memory_back() -> None:
    """Tell glibc to serve every block of 128 KiB or more by mmap and so return it to the system when freed, so
    that memory freed earlier (by the fit, by earlier calls) does not hide a call's growth. Only for the memory
    pass: every large temporary then costs fresh pages, which would distort the timings."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD, fixed (no dynamic raise after frees)
    libc.malloc_trim(0)


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def peak_growth_mib(call) -> float:
    """Peak resident memory growth of ``call()`` (Linux), after ``hold_freed_memory_back``."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the current RSS
    before = _rss_kib("VmRSS")
    call()
    return (_rss_kib("VmHWM") - before) / 1024


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


def first_difference(model, run_alone, run_among, n_among: int) -> dict:
    """Whether test row 0's prediction is bitwise the same alone and among ``n_among`` rows, and if not, the first
    leaf module (in call order) whose output for row 0 differs: every leaf module's output is captured in both
    runs and row 0 read along the axis that has 1 entry alone and ``n_among`` among the others."""
    import torch

    def capture():
        outputs, handles = [], []
        for name, module in model.named_modules():
            if not list(module.children()):
                handles.append(module.register_forward_hook(
                    lambda m, i, o, name=name: outputs.append((name, o.detach().clone()))
                    if isinstance(o, torch.Tensor) else None))
        return outputs, handles

    runs = []
    for run in (run_alone, run_among):
        outputs, handles = capture()
        try:
            final = run()
        finally:
            for h in handles:
                h.remove()
        runs.append((final, outputs))
    (alone, alone_outs), (among, among_outs) = runs
    result = {"rows_among": n_among, "bitwise_equal": bool(torch.equal(alone[0:1], among[0:1])),
              "max_abs_difference": float((alone[0:1].double() - among[0:1].double()).abs().max())}
    for (name, a), (_, b) in zip(alone_outs, among_outs):
        axes = [d for d in range(a.dim()) if a.shape[d] == 1 and b.shape[d] == n_among
                and a.shape[:d] + a.shape[d + 1:] == b.shape[:d] + b.shape[d + 1:]]
        if axes and not torch.equal(a, b.narrow(axes[0], 0, 1)):
            result["first_differing_module"] = name
            result["its_type"] = type(dict(model.named_modules())[name]).__name__
            result["its_max_abs_difference"] = float((a.double() - b.narrow(axes[0], 0, 1).double()).abs().max())
            break
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--test", type=int, nargs="+", default=[1, 64, 1024])
    parser.add_argument("--fit-rows", type=int, default=20_000, help="training rows actually fitted")
    parser.add_argument("--features", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="4 layers, 2,000 training rows, 1 and 64 test rows")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/...)")
    parser.add_argument("--invariance", action="store_true",
                        help="instead of timing: is a test row's prediction bitwise the same alone and among 63 others "
                             "under register(policy='all', batch_invariant=True), and if not, which layer breaks it "
                             "(random weights, std 2 / sqrt(fan-in))")
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
    if args.invariance:
        with torch.no_grad():  # TabPFN's initialisation zeroes projections, hiding most layers from the output
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / max(1, p.shape[-1]) ** 0.5))
            _, fitted = model(x_fit, y_fit, return_kv_cache=True,
                              performance_options=PerformanceOptions(kv_cache_dtype=torch.int8))
        x_test = torch.randn(64, 1, args.features, generator=gen)
        found = {}
        for mode in ("tabpfn", "all"):
            if mode == "all":
                mha_cupy.tabpfn.register(policy="all", batch_invariant=True)
            try:
                with torch.no_grad():
                    found[mode] = first_difference(
                        model, lambda: model(x_test[:1], y_fit, kv_cache=fitted, x_is_test_only=True),
                        lambda: model(x_test, y_fit, kv_cache=fitted, x_is_test_only=True), 64)
            finally:
                mha_cupy.tabpfn.unregister()
        print(json.dumps({"invariance": found, "config": config, "fit_rows": args.fit_rows, "machine": machine(),
                          "versions": versions()}))
        return

    def predict(mode, x_test, y, cache, measure):
        """``measure(predict)`` under ``mode``, the output, and how many attention calls were ours, of how many."""
        out = {}
        if mode != "tabpfn":
            mha_cupy.tabpfn.register(policy=mode)
        try:
            with torch.no_grad(), recorded_attention_backends() as calls:
                value = measure(lambda: out.setdefault("y", model(x_test, y, kv_cache=cache, x_is_test_only=True)))
        finally:
            mha_cupy.tabpfn.unregister()
        return value, out["y"], sum(c is not None for c in calls), len(calls)

    def configurations():
        for n_train in args.train:
            times = -(-n_train // args.fit_rows)
            cache, y = (fitted, y_fit) if times == 1 else repeat_cache(fitted, y_fit, times)
            for n_test in args.test:
                yield n_train, n_test, cache, y, torch.randn(n_test, 1, args.features,
                                                             generator=torch.Generator().manual_seed(n_test))

    rows = []
    for n_train, n_test, cache, y, x_test in configurations():  # timings, with glibc's usual behaviour
        row = {"train_rows": n_train, "fitted_rows": min(n_train, args.fit_rows), "test_rows": n_test,
               "dense_copy_mib": round(2 * cache.kv[0].key.numel() * 4 / 2**20, 1)}
        seconds, outputs = {m: [] for m in MODES}, {}
        for r in range(args.repeats + 1):  # interleaved; the first round warms up (numba's kernels load)
            for mode in MODES:
                t, outputs[mode], ours, calls = predict(mode, x_test, y, cache, timed)
                seconds[mode] += [t] if r else []
                row[mode] = {"calls_ours": ours, "calls": calls}
        ref = outputs["tabpfn"].double()
        for mode in MODES:
            row[mode].update(median_s=round(statistics.median(seconds[mode]), 4),
                             times_s=[round(t, 4) for t in seconds[mode]],
                             scaled_error=float((outputs[mode].double() - ref).abs().max() / max(1.0, float(ref.abs().max()))))
            if mode != "tabpfn":
                row[mode]["time_ratio"] = round(row[mode]["median_s"] / row["tabpfn"]["median_s"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    hold_freed_memory_back()
    for row, (_, _, cache, y, x_test) in zip(rows, configurations()):  # then memory
        for mode in MODES:
            row[mode]["peak_growth_mib"] = round(statistics.median(
                predict(mode, x_test, y, cache, peak_growth_mib)[0] for _ in range(2)), 1)
        print(json.dumps({k: row[k] for k in ("train_rows", "test_rows", "dense_copy_mib")}
                         | {m: row[m]["peak_growth_mib"] for m in MODES}), flush=True)

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
