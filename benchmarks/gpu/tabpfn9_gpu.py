"""TabPFN 9 on a GPU with mha_cupy as its attention backend, on both CUDA routes, against TabPFN's own attention.

Two models with random weights (std 2 / sqrt(fan-in), as ``tests_tabpfn9/conftest.py::random_model``) in their
real default configurations: TabPFN-3.5 (tabpfn 9.2's default model, ``tabpfn_v3_5.TabPFNV3p5Config``: 24 ICL
layers of 16 heads of 64, one KV head for test rows) and TabPFN-3 (``tabpfn_v3.TabPFNV3Config``: 24 layers of
8 heads of 64). Each runs a plain forward over training and test rows, and a fit with an int8 KV cache
(``PerformanceOptions(kv_cache_dtype=torch.int8)``) followed by a predict of the test rows from that cache, on
three sides: TabPFN's own path (mha_cupy unregistered: the reference) and mha_cupy registered
``policy="all"`` with ``mha_cupy.tabpfn.CUDA_ENABLED = True`` and ``CUDA_ROUTE`` "cupy" (CuPy through DLPack)
or "torch" (our torch adapter on the CUDA tensors).

First the checks, every side of every model once (that run is also its warm-up): every attention call ours
(``attention_backends.recorded_attention_backends``), on the route asked for, the cached predict's calls fed
the int8 entries as stored, each call within 1e-5 (scaled: max|a - r| / max(1, max|r|)) of TabPFN's own path
on the same inputs, and both model outputs within 1e-5 of the reference side's. Then the timings, while
``--time-budget`` seconds since the start are not spent: per phase (predict, plain, fit) and side, the median
of ``--repeats`` runs (``torch.cuda.synchronize()`` around each), torch's peak allocated memory
(``reset_peak_memory_stats``/``max_memory_allocated``) and CuPy's default pool high-water (emptied before the
phase, ``total_bytes()`` after it; a pool of its own beside torch's caching allocator).

``--dry-run`` runs the same on the CPU with small sizes, ``CUDA_ENABLED`` left off (mha_cupy's CPU path then
serves both "routes"; no route or GPU-memory checks). One case failing is recorded (the traceback's last lines)
and the others still run. The JSON (``--out``) is rewritten after every case, so a run killed by the caller's
``timeout`` leaves what it finished (``complete`` false). Exit status 1 if any check failed or the run is
incomplete, 0 otherwise.

Run: ``PYTHONPATH=<site with tabpfn==9.2.0 and mha_cupy> python benchmarks/gpu/tabpfn9_gpu.py [--dry-run]
[--out FILE.json] [--train-rows 10000] [--test-rows 1000] [--repeats 3] [--time-budget 40]``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

TOL = 1e-5
MODELS = ("v3.5", "v3")
SIDES = ("tabpfn", "cupy", "torch")  # "tabpfn": TabPFN's own path, the reference
PHASES = ("predict", "plain", "fit")  # the order of the timing pass: the cached predict matters most
N_CLASSES = 3
START = time.perf_counter()


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="on the CPU, small sizes, CUDA_ENABLED left off")
    p.add_argument("--out", type=Path, help="write the JSON here (rewritten after every case)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {MODELS}")
    p.add_argument("--train-rows", type=_positive, help="default 10000 (dry run 96)")
    p.add_argument("--test-rows", type=_positive, help="default 1000 (dry run 16)")
    p.add_argument("--features", type=_positive, default=6)
    p.add_argument("--layers", type=_positive, help="ICL layers instead of the configs' 24 (default 24; dry run 2)")
    p.add_argument("--repeats", type=_positive, help="timed runs per phase and side, after the checks' run (default 3; "
                                               "dry run 1)")
    p.add_argument("--time-budget", type=float,
                   help="no timing starts after this many seconds since the start; the checks always run (default "
                        "40, dry run 30: the campaign gives this part 90 s)")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"--models: unknown {unknown}, expected some of {MODELS}")
    small = args.dry_run
    args.train_rows = args.train_rows or (96 if small else 10_000)
    args.test_rows = args.test_rows or (16 if small else 1000)
    args.layers = args.layers or (2 if small else None)
    args.repeats = args.repeats or (1 if small else 3)
    args.time_budget = args.time_budget if args.time_budget is not None else (30.0 if small else 40.0)
    return args


# -- models and data --------------------------------------------------------------------------------------------


def _positive(text: str) -> int:
    """An argument that must be a whole number above 0."""
    value = int(text)
    if value < 1:
        msg = f"must be a whole number of at least 1, got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def random_model(kind: str, layers: int | None, seed: int = 0) -> Any:
    """TabPFN-3.5 or TabPFN-3 in its default configuration (10 classes), random weights as the tests' models."""
    import torch
    from tabpfn.architectures import tabpfn_v3, tabpfn_v3_5

    module, config_cls = ((tabpfn_v3_5, tabpfn_v3_5.TabPFNV3p5Config) if kind == "v3.5"
                          else (tabpfn_v3, tabpfn_v3.TabPFNV3Config))
    config = config_cls(max_num_classes=10, num_buckets=5000, **({} if layers is None else {"nlayers": layers}))
    torch.manual_seed(seed)
    model = module.get_architecture(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / max(1, p.shape[-1]) ** 0.5))
    return model


def dataset(n_train: int, n_test: int, n_features: int, device: Any, seed: int = 0) -> tuple[Any, Any]:
    """``x [n_train + n_test, 1, features]`` and ``y [n_train]`` (three classes), on ``device``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, 1, n_features, generator=gen)
    y = torch.randint(0, N_CLASSES, (n_train,), generator=gen).float()
    return x.to(device), y.to(device)


class Runner:
    """The three phases of one model on one dataset."""

    def __init__(self, model: Any, x: Any, y: Any, n_train: int) -> None:
        import torch
        from tabpfn.architectures.interface import PerformanceOptions

        self.model, self.x, self.y, self.n_train = model, x, y, n_train
        self.options = PerformanceOptions(kv_cache_dtype=torch.int8)
        self.cache: Any = None
        self.model_layers = len(model.icl_blocks)  # ICL layers: one int8 cache entry each

    def plain(self) -> Any:
        return self.model(self.x, self.y, task_type="multiclass")

    def fit(self) -> Any:
        _, self.cache = self.model(self.x[:self.n_train], self.y, task_type="multiclass", return_kv_cache=True,
                                   performance_options=self.options)
        return self.cache

    def predict(self) -> Any:
        return self.model(self.x[self.n_train:], self.y, task_type="multiclass", kv_cache=self.cache,
                          x_is_test_only=True)


# -- measuring --------------------------------------------------------------------------------------------------


def scaled_error(actual: Any, reference: Any) -> float:
    ref = reference.double()
    return float((actual.double() - ref).abs().max() / max(1.0, float(ref.abs().max())))


class Device:
    """Synchronisation and memory figures of the device the run is on (none on the CPU)."""

    def __init__(self, device: Any) -> None:
        import torch

        self.device = device
        self.cuda = device.type == "cuda"
        self.torch = torch
        self.cupy = None
        if self.cuda:
            with contextlib.suppress(ImportError):
                import cupy

                self.cupy = cupy

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)  # CuPy's work is on torch's stream: covered too

    def reset(self) -> dict[str, Any]:
        """Start a phase: torch's peak reset, CuPy's pool emptied; returns the memory held now."""
        gc.collect()
        if not self.cuda:
            return {}
        self.sync()
        if self.cupy is not None:
            self.cupy.get_default_memory_pool().free_all_blocks()
        self.torch.cuda.empty_cache()
        self.torch.cuda.reset_peak_memory_stats(self.device)
        return {"torch_allocated_start": self.torch.cuda.memory_allocated(self.device)}

    def peaks(self, start: dict[str, Any]) -> dict[str, Any]:
        if not self.cuda:
            return {"torch_peak": None, "torch_peak_growth": None, "cupy_pool_high_water": None}
        self.sync()
        peak = self.torch.cuda.max_memory_allocated(self.device)
        pool = self.cupy.get_default_memory_pool().total_bytes() if self.cupy is not None else None
        return {"torch_peak": peak, "torch_peak_growth": peak - start["torch_allocated_start"],
                "cupy_pool_high_water": pool}

    def cleanup(self) -> None:
        gc.collect()
        if self.cuda:
            with contextlib.suppress(Exception):
                self.sync()
            if self.cupy is not None:
                self.cupy.get_default_memory_pool().free_all_blocks()
            self.torch.cuda.empty_cache()


@contextlib.contextmanager
def side_set(side: str, dev: Device) -> Iterator[dict[str, int]]:
    """mha_cupy registered (``policy="all"``, the route, CUDA_ENABLED on CUDA) or not, for ``side``; yields the
    number of calls each route served (``_on_cupy``/``_on_torch`` counted)."""
    import mha_cupy.tabpfn as mt

    saved = {n: getattr(mt, n) for n in ("CUDA_ENABLED", "CUDA_ROUTE", "_on_cupy", "_on_torch")}
    counts = {"cupy": 0, "torch": 0}

    def counted(route: str) -> Callable[..., Any]:
        original = saved[f"_on_{route}"]

        def run(*args: Any, **kwargs: Any) -> Any:
            counts[route] += 1
            return original(*args, **kwargs)
        return run

    try:
        mt.unregister()
        if side != "tabpfn":
            mt.CUDA_ENABLED = dev.cuda
            mt.CUDA_ROUTE = side
            mt._on_cupy, mt._on_torch = counted("cupy"), counted("torch")
            mt.register(policy="all")
        yield counts
    finally:
        mt.unregister()
        for n, v in saved.items():
            setattr(mt, n, v)


@contextlib.contextmanager
def spied() -> Iterator[list[dict[str, Any]]]:
    """Each call of our backend also runs TabPFN's own path on the same inputs: its scaled error, and the storage
    dtype of the quantized entry it was handed (as ``tests_tabpfn9/conftest.py``'s Spy)."""
    from tabpfn.architectures.shared import attention_backends
    from tabpfn.architectures.shared.scaled_dot_product_attention import scaled_dot_product_attention as tabpfn_sdpa

    from mha_cupy.tabpfn import TabPFNAttentionBackend

    records: list[dict[str, Any]] = []
    run = TabPFNAttentionBackend.run

    def spy(backend: Any, q: Any, k: Any, v: Any, *, quantized_kv: Any = None, **kwargs: Any) -> Any:
        ours = run(backend, q, k, v, quantized_kv=quantized_kv, **kwargs)
        with attention_backends.recorded_attention_backends():  # not among the model's calls
            theirs = tabpfn_sdpa(q, k, v, quantized_kv=quantized_kv, backend=None)
        records.append({"error": scaled_error(ours, theirs), "dense_kv": k is not None,
                        "quantized": None if quantized_kv is None else str(quantized_kv.key.dtype)})
        return ours

    TabPFNAttentionBackend.run = spy
    try:
        yield records
    finally:
        TabPFNAttentionBackend.run = run


def check_side(runner: Runner, side: str, dev: Device, reference: dict[str, Any] | None) -> dict[str, Any]:
    """One run of every phase on ``side``, recorded and checked (for the reference side: its outputs kept)."""
    import torch
    from tabpfn.architectures.shared import attention_backends

    case: dict[str, Any] = {"side": side, "route": None if side == "tabpfn" else side}
    problems: list[str] = []
    outputs: dict[str, Any] = {}
    calls: dict[str, list[Any]] = {}
    with side_set(side, dev) as counts, (spied() if side != "tabpfn" else contextlib.nullcontext([])) as records, \
            torch.no_grad():
        start = dev.reset()
        first: dict[str, float] = {}
        for phase in ("plain", "fit", "predict"):
            dev.sync()
            t0 = time.perf_counter()
            with attention_backends.recorded_attention_backends() as recorded:
                result = getattr(runner, phase)()
            dev.sync()
            first[phase] = time.perf_counter() - t0
            calls[phase] = list(recorded)
            if phase != "fit":
                outputs[phase] = result
        case["first_run_s"] = {p: round(t, 4) for p, t in first.items()}  # with one-time costs: see "notes"
        case["first_run_memory"] = dev.peaks(start)
    runner.cache = None
    ours = {p: sum(c is not None and c.name == "mha_cupy" for c in cs) for p, cs in calls.items()}
    total = {p: len(cs) for p, cs in calls.items()}
    case["calls_ours"], case["calls_total"] = ours, total
    if not all(torch.isfinite(o).all() for o in outputs.values()):
        problems.append("non-finite outputs")
    if side == "tabpfn":
        if sum(ours.values()):
            problems.append(f"reference side: {sum(ours.values())} calls were mha_cupy's")
        case["outputs"] = {p: o.detach() for p, o in outputs.items()}
    else:
        if not sum(total.values()) or ours != total:
            problems.append(f"calls not ours: ours {ours} of {total}")
        case["calls_by_route"] = dict(counts)
        # TabPFN's recorder saw one call per layer fewer than ran (on an H200, TabPFN-3.5: 122 runs, 98 recorded, 24
        # layers): the spy, which wraps every run, counts the calls served.
        case["calls_served_unrecorded"] = len(records) - sum(ours.values())
        must_torch = len(records) if side == "torch" else sum(r["quantized"] == str(torch.float8_e4m3fn) for r in records)
        if dev.cuda and (counts["torch"] != must_torch or sum(counts.values()) != len(records)):
            problems.append(f"route {side!r} not taken by every call it should serve: {counts} of {len(records)} "
                            f"calls ({must_torch} must take torch's)")
        errors = [r["error"] for r in records]
        case["max_call_error"] = max(errors, default=None)
        case["calls_off_tolerance"] = sum(not e <= TOL for e in errors)
        if case["calls_off_tolerance"]:
            problems.append(f"{case['calls_off_tolerance']} calls off TabPFN's own by more than {TOL}")
        int8 = [r for r in records if r["quantized"] == "torch.int8" and not r["dense_kv"]]
        case["int8_calls_as_stored"] = len(int8)
        if len(int8) != runner.model_layers:
            problems.append(f"{len(int8)} calls got an int8 entry as stored, expected one per ICL layer "
                            f"({runner.model_layers})")
        if reference is None:
            problems.append("no reference outputs (the reference side failed)")
        else:
            case["errors"] = {p: scaled_error(outputs[p], reference[p]) for p in outputs}
            problems += [f"{p} output: error {e:.2e}" for p, e in case["errors"].items() if not e <= TOL]
    case["problems"] = problems
    case["ok"] = not problems
    return case


def time_phase(runner: Runner, side: str, phase: str, dev: Device, repeats: int) -> dict[str, Any]:
    """Median of ``repeats`` runs of ``phase`` on ``side`` (after the checks' run), with the phase's peak memory."""
    import torch

    with side_set(side, dev), torch.no_grad():
        if phase == "predict":
            runner.fit()  # its cache, untimed and outside the phase's memory figures' reset
        start = dev.reset()
        times = []
        for _ in range(repeats):
            dev.sync()
            t0 = time.perf_counter()
            out = getattr(runner, phase)()
            dev.sync()
            times.append(time.perf_counter() - t0)
            del out
        memory = dev.peaks(start)
    runner.cache = None
    return {"median_s": round(statistics.median(times), 5), "times_s": [round(t, 5) for t in times], **memory}


# -- the run ----------------------------------------------------------------------------------------------------


def tail(exc: BaseException) -> list[str]:
    """The last lines of ``exc``'s traceback, without the lines that only point (``^^^``)."""
    lines = traceback.format_exception(exc)
    lines = [ln for chunk in lines for ln in chunk.rstrip("\n").splitlines() if ln.strip(" ^~")]
    return lines[-8:]


def environment(dev: Device) -> dict[str, Any]:
    import numpy
    import torch

    import mha_cupy

    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                           "cpu_cores": os.cpu_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                           "numpy": numpy.__version__, "mha_cupy": mha_cupy.__version__,
                           "mha_cupy_file": mha_cupy.__file__}
    for dist in ("tabpfn", "cupy-cuda13x", "cupy-cuda12x", "array-api-compat"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            env[dist] = metadata.version(dist)
    with contextlib.suppress(Exception):
        import subprocess

        env["commit"] = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=5,
                                       cwd=Path(__file__).resolve().parent).stdout.strip() or None
    import mha_cupy.tabpfn as mt

    env["cuda_enabled_default"] = mt.CUDA_ENABLED
    env["cuda_route_default"] = mt.CUDA_ROUTE
    if not dev.cuda:
        return env
    props = torch.cuda.get_device_properties(dev.device)
    free, total = torch.cuda.mem_get_info(dev.device)
    env.update(gpu=torch.cuda.get_device_name(dev.device),
               capability=list(torch.cuda.get_device_capability(dev.device)),
               gpu_memory_total=total, gpu_memory_free=free, multiprocessors=props.multi_processor_count,
               cupy_tf32=os.environ.get("CUPY_TF32"))
    from mha_cupy._backends import resolve_backend

    optional = {  # each read on its own: one that fails leaves the others
        "torch_matmul_fp32_precision": lambda: torch.backends.cuda.matmul.fp32_precision,
        "torch_matmul_allow_tf32": lambda: torch.backends.cuda.matmul.allow_tf32,
        "cupy": lambda: dev.cupy.__version__,
        "cupy_cuda_runtime": lambda: dev.cupy.cuda.runtime.runtimeGetVersion(),
        "cuda_driver": lambda: dev.cupy.cuda.runtime.driverGetVersion(),
        "default_budget_torch": lambda: resolve_backend("torch").default_memory_budget(dev.device),
        "default_budget_cupy": lambda: resolve_backend("cupy").default_memory_budget(dev.cupy.cuda.Device(0)),
    }
    for name, read in optional.items():
        try:
            env[name] = read()
        except Exception as exc:  # noqa: BLE001
            env[name] = f"unavailable: {type(exc).__name__}: {exc}"[:200]
    return env


def summarize(cases: list[dict[str, Any]], complete: bool) -> tuple[bool, str]:
    checks = [c for c in cases if c["kind"] == "check"]
    failed = [f"{c['model']}/{c['side']}" for c in checks if not c.get("ok")]
    timing_failed = [f"{c['model']}/{c['side']}/{c['phase']}" for c in cases
                     if c["kind"] == "timing" and c.get("error")]
    ok = complete and bool(checks) and not failed and not timing_failed
    parts = [f"{sum(c.get('ok', False) for c in checks)}/{len(checks)} checks ok"]
    if failed:
        parts.append("failed: " + ", ".join(failed))
    if timing_failed:
        parts.append("timings failed: " + ", ".join(timing_failed))
    for c in checks:
        if c["side"] != "tabpfn" and c.get("errors"):
            parts.append(f"{c['model']}/{c['side']} err {max(c['errors'].values()):.1e}")
    ratios = _time_ratios(cases)
    if ratios:
        parts.append("ours/tabpfn time " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    if not complete:
        parts.insert(0, "INCOMPLETE")
    return ok, "; ".join(parts)


def _time_ratios(cases: list[dict[str, Any]]) -> dict[str, float]:
    timed = {(c["model"], c["side"], c["phase"]): c["median_s"] for c in cases if c.get("median_s")}
    return {f"{m}/{s}/{p}": t / timed[(m, "tabpfn", p)] for (m, s, p), t in timed.items()
            if s != "tabpfn" and (m, "tabpfn", p) in timed}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    import torch

    if args.dry_run:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("tabpfn9_gpu.py: no CUDA device (torch.cuda.is_available() is False); --dry-run runs on the CPU")
        return 1
    else:
        device = torch.device("cuda", 0)
    dev = Device(device)
    report: dict[str, Any] = {"ok": False, "summary": "", "complete": False, "dry_run": args.dry_run,
                              "config": {"models": args.models, "train_rows": args.train_rows,
                                         "test_rows": args.test_rows, "features": args.features,
                                         "layers": args.layers or "default (24)", "repeats": args.repeats,
                                         "time_budget_s": args.time_budget, "tolerance": TOL,
                                         "kv_cache_dtype": "int8", "policy": "all"},
                              "notes": {
                                  "errors": "scaled: max|ours - reference| / max(1, max|reference|), float32",
                                  "first_run_s": "the checks' run: one-time costs (CuPy's kernel compiles, cuBLAS "
                                                 "handles) and, on our sides, TabPFN's own path run beside each call",
                                  "memory": "torch_peak: max_memory_allocated over the phase (growth: above the "
                                            "memory held at its start); cupy_pool_high_water: CuPy's default pool "
                                            "(emptied at the start), a pool of its own beside torch's allocator"},
                              "environment": {}, "cases": []}
    cases: list[dict[str, Any]] = report["cases"]

    def save(complete: bool = False) -> None:
        report["complete"] = complete
        report["ok"], report["summary"] = summarize(cases, complete)
        report["elapsed_s"] = round(time.perf_counter() - START, 1)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.out.with_suffix(args.out.suffix + ".tmp")
            tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
            tmp.replace(args.out)

    try:
        report["environment"] = environment(dev)
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        report["environment"] = {"error": tail(exc)}
    print(f"tabpfn9_gpu: {'dry run on the CPU' if args.dry_run else report['environment'].get('gpu', device)}, "
          f"{args.train_rows} training rows, {args.test_rows} test rows, {args.features} features, "
          f"models {args.models}", flush=True)

    runners: dict[str, Runner] = {}
    for kind in args.models:  # the checks: every side once
        try:
            t0 = time.perf_counter()
            model = random_model(kind, args.layers).to(device)
            runner = Runner(model, *dataset(args.train_rows, args.test_rows, args.features, device), args.train_rows)
            runners[kind] = runner
            build_s = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001
            cases += [{"kind": "check", "model": kind, "side": s, "ok": False, "error": tail(exc)} for s in SIDES]
            save()
            continue
        reference = None
        for side in SIDES:
            try:
                case = check_side(runner, side, dev, reference)
            except Exception as exc:  # noqa: BLE001
                case = {"side": side, "ok": False, "error": tail(exc)}
            if side == "tabpfn" and case.get("ok"):
                reference = case.pop("outputs")
            case.pop("outputs", None)
            cases.append({"kind": "check", "model": kind, "build_s": round(build_s, 2), **case})
            dev.cleanup()
            save()
            _print_check(cases[-1])

    for phase in PHASES:  # the timings, while the budget lasts
        for kind, runner in runners.items():
            for side in SIDES:
                entry: dict[str, Any] = {"kind": "timing", "model": kind, "side": side, "phase": phase}
                if time.perf_counter() - START > args.time_budget:
                    entry["skipped"] = f"time budget of {args.time_budget} s spent"
                else:
                    try:
                        entry.update(time_phase(runner, side, phase, dev, args.repeats))
                    except Exception as exc:  # noqa: BLE001
                        entry["error"] = tail(exc)
                    dev.cleanup()
                cases.append(entry)
                save()
                _print_timing(entry)
    save(complete=True)
    print(f"tabpfn9_gpu: {'ok' if report['ok'] else 'FAILED'} in {report['elapsed_s']} s: {report['summary']}")
    return 0 if report["ok"] else 1


def _mib(n: Any) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def _print_check(c: dict[str, Any]) -> None:
    if "error" in c:
        print(f"  check {c['model']:4s} {c['side']:6s} ERROR {c['error'][-1]}", flush=True)
        return
    first = " ".join(f"{p} {t:.2f}s" for p, t in c.get("first_run_s", {}).items())
    calls = f"calls ours {sum(c['calls_ours'].values())}/{sum(c['calls_total'].values())}"
    errs = "" if not c.get("errors") else " err " + " ".join(f"{p} {e:.1e}" for p, e in c["errors"].items())
    route = "" if not c.get("calls_by_route") else f" routes {c['calls_by_route']}"
    print(f"  check {c['model']:4s} {c['side']:6s} {'ok' if c['ok'] else 'FAIL'}: {calls}{route}{errs}; first run "
          f"{first}" + ("" if c["ok"] else f"; {c['problems']}"), flush=True)


def _print_timing(t: dict[str, Any]) -> None:
    head = f"  time  {t['model']:4s} {t['side']:6s} {t['phase']:7s}"
    if "skipped" in t:
        print(f"{head} skipped: {t['skipped']}", flush=True)
    elif "error" in t:
        print(f"{head} ERROR {t['error'][-1]}", flush=True)
    else:
        memory = "" if t["torch_peak"] is None else (
            f"  torch peak {_mib(t['torch_peak'])} (+{_mib(t['torch_peak_growth'])}), "
            f"cupy pool {_mib(t['cupy_pool_high_water'])}")
        print(f"{head} {t['median_s'] * 1e3:9.1f} ms{memory}", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
