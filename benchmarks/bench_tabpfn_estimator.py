"""TabPFN 9's estimator as users run it, with and without mha_cupy: ``TabPFNClassifier`` on a random-weight
TabPFN-3.5 (tabpfn 9's default model, its default configuration), TabPFN's defaults, predict timed under
TabPFN's own path, ``register(policy="auto")`` and ``register(policy="all")``, in one process.

TabPFN's defaults: ``inference_precision="auto"`` (bfloat16 autocast on CPUs with AVX512-BF16 or AMX, float32
elsewhere; ``--precision float32`` forces float32), ``fit_mode="fit_preprocessors"`` (every predict runs the
training rows again) or ``--fit-mode fit_with_cache`` (an int8 KV cache, TabPFN's default
``kv_cache_precision`` there), ``device="cpu"``. One exception, for time: ``n_estimators`` (``--estimators``,
default 1; TabPFN's "auto" runs 8 here, each the same work over differently preprocessed data, so a predict's
time scales with it). ``ignore_pretraining_limits=True`` (TabPFN refuses more than 5,000 CPU rows otherwise).

Data: ``--features`` standard normal features, a label from the first. Per training size the estimator is
fitted once (by TabPFN's own path: the predict is what is timed); per test size the three modes predict
``--repeats`` times each, interleaved, after a small fit and predict under every mode at the start (imports,
thread pools and numba's kernels load there; a fit_preprocessors predict at 10,000 rows takes a minute and a
half, so one repeat is the default). Peak memory, unless ``--no-memory``: after every timing, glibc is told to
return freed blocks (``bench_tabpfn_backend.hold_freed_memory_back``, which would distort timings) and each mode
predicts once more for the growth of the resident peak over the predict (``peak_growth_mib``, Linux).
``stats()`` counts the calls each mode took.

Needs tabpfn 9 (``pip install "tabpfn==9.2.0" ".[fast]"``). Run, nothing else on the machine:
``python benchmarks/bench_tabpfn_estimator.py [--train 10000 20000] [--test 1 64 1024]
[--fit-mode fit_preprocessors|fit_with_cache] [--precision auto|float32] [--estimators 1] [--repeats 1]
[--no-memory] [--dispatch avx2]``; ``--invariance`` instead measures batch invariance (see ``invariance``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests_tabpfn9"))
from _common import add_dispatch_argument, apply_dispatch, header, new_result, write_result  # noqa: E402
from bench_tabpfn_backend import hold_freed_memory_back, peak_growth_mib, timed  # noqa: E402

MODES = ("tabpfn", "auto", "all")


def seconds(call) -> tuple[float, float]:
    """Seconds of ``call()``, and no memory figure (the timing pass)."""
    return timed(call), float("nan")


def peak(call) -> tuple[float, float]:
    """No time, and the growth of the resident peak over ``call()``, MiB (the memory pass; see the docstring)."""
    return float("nan"), peak_growth_mib(call)


def fitted(path: Path, x, y, args):
    import torch
    from tabpfn import TabPFNClassifier

    options = {"model_path": path, "device": "cpu", "random_state": 0, "n_estimators": args.estimators,
               "fit_mode": args.fit_mode, "ignore_pretraining_limits": True}
    if args.precision == "float32":
        options["inference_precision"] = torch.float32
    return TabPFNClassifier(**options).fit(x, y)


def predict(mode: str, estimator, test, measure=seconds) -> tuple[float, float, dict | None, list]:
    """One predict under ``mode``: ``measure``'s seconds and peak growth (MiB), ``stats()`` (None for TabPFN's own
    path) and the probabilities of the first row."""
    import mha_cupy.tabpfn

    if mode != "tabpfn":
        mha_cupy.tabpfn.register(policy=mode)
    try:
        out = {}
        elapsed, growth = measure(lambda: out.setdefault("p", estimator.predict_proba(test)))
        return elapsed, growth, (mha_cupy.tabpfn.stats() if mode != "tabpfn" else None), out["p"][0].tolist()
    finally:
        mha_cupy.tabpfn.unregister()


def data(n_train: int, n_test: int, features: int, seed: int):
    import numpy as np

    x = np.random.default_rng(seed).standard_normal((n_train + n_test, features)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    return x[:n_train], y[:n_train], x[n_train:]


def warm_up(path: Path, args) -> None:
    """A small fit and predict under every mode first: imports, thread pools and numba's kernels load here."""
    x, y, test = data(300, 8, args.features, 0)
    estimator = fitted(path, x, y, args)
    for mode in MODES:
        predict(mode, estimator, test)


def measure(n_train: int, path: Path, args) -> tuple[list[dict], object, object]:
    """Per test size, ``--repeats`` predicts under each mode, interleaved, from one fit (TabPFN's own: the fit
    is not what is timed)."""
    x, y, tests = data(n_train, max(args.test), args.features, n_train)
    start = time.perf_counter()
    estimator = fitted(path, x, y, args)
    fit_s = time.perf_counter() - start
    rows = []
    for t in args.test:
        runs = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                runs[mode].append(predict(mode, estimator, tests[:t]))
        row = {"train_rows": n_train, "test_rows": t, "fit_s": fit_s}
        for mode, found in runs.items():
            row[mode] = {"median_s": statistics.median(r[0] for r in found), "times_s": [r[0] for r in found],
                         "calls_taken": None if found[0][2] is None else found[0][2]["taken"],
                         "declined": None if found[0][2] is None else found[0][2]["declined"],
                         "first_row_proba": found[0][3]}
            print(f"S={n_train} T={t} {mode:6s} {row[mode]['median_s']:8.2f} s  taken {row[mode]['calls_taken']}",
                  flush=True)
        for mode in ("auto", "all"):
            row[mode]["vs_tabpfn"] = row[mode]["median_s"] / row["tabpfn"]["median_s"]
        rows.append(row)
    return rows, estimator, tests


def memory_pass(rows: list[dict], estimator, tests) -> None:
    """Each row's peak growth per mode (``peak_growth_mib``: glibc already told to return freed blocks)."""
    for row in rows:
        for mode in MODES:
            row[mode]["peak_growth_mib"] = predict(mode, estimator, tests[:row["test_rows"]], peak)[1]
        print(f"S={row['train_rows']} T={row['test_rows']} peak growth MiB " +
              " ".join(f"{m} {row[m]['peak_growth_mib']:.0f}" for m in MODES), flush=True)


def invariance(path: Path, args) -> list[dict]:
    """Whether test row 0's probabilities are bitwise the same predicted alone and among ``--among`` rows (the
    first ``--among`` test rows), TabPFN's own path and ``register(policy="all", batch_invariant=True)``, fitted on
    the first ``--train`` size; if not, the first leaf module of the model whose output for row 0 differs
    (``bench_tabpfn_backend.first_difference``). Model weights: TabPFN-3.5's, random (``checkpoints.randomize``,
    std 2 / sqrt(fan-in))."""
    from bench_tabpfn_backend import first_difference

    import mha_cupy.tabpfn

    x, y, tests = data(args.train[0], args.among, args.features, 0)
    estimator = fitted(path, x, y, args)
    found = []
    for mode in ("tabpfn", "all"):
        if mode == "all":
            mha_cupy.tabpfn.register(policy="all", batch_invariant=True)
        try:
            result = first_difference(estimator.models_[0], lambda: _tensor(estimator.predict_proba(tests[:1])),
                                      lambda: _tensor(estimator.predict_proba(tests)), args.among)
        finally:
            mha_cupy.tabpfn.unregister()
        found.append({"mode": mode, "train_rows": args.train[0], **result})
        print(found[-1], flush=True)
    return found


def _tensor(a):
    import torch

    return torch.from_numpy(a)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, nargs="+", default=[10_000, 20_000])
    parser.add_argument("--test", type=int, nargs="+", default=[1, 64, 1024])
    parser.add_argument("--fit-mode", choices=("fit_preprocessors", "fit_with_cache"), default="fit_preprocessors")
    parser.add_argument("--precision", choices=("auto", "float32"), default="auto")
    parser.add_argument("--estimators", type=int, default=1)
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                        help="after the timings, one more predict per mode and shape for its peak memory")
    parser.add_argument("--invariance", action="store_true",
                        help="instead of timing: is a test row's prediction bitwise the same alone and among --among "
                             "rows, TabPFN's own and register(policy='all', batch_invariant=True)")
    parser.add_argument("--among", type=int, default=64)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    add_dispatch_argument(parser)
    args = parser.parse_args()
    apply_dispatch(args.dispatch)

    import torch
    from checkpoints import checkpoint_name, write_checkpoint
    from tabpfn.utils import infer_autocast_inference_mode

    import mha_cupy.tabpfn

    autocast = args.precision == "auto" and infer_autocast_inference_mode([torch.device("cpu")], enable=None)
    with tempfile.TemporaryDirectory() as folder:
        path = write_checkpoint(Path(folder) / checkpoint_name("v3.5"), "v3.5", config={})
        if args.invariance:
            return _write_invariance(invariance(path, args), args)
        warm_up(path, args)
        measured = [measure(n, path, args) for n in args.train]
        if args.memory:  # after every timing: this slows what follows
            hold_freed_memory_back()
            for found in measured:
                memory_pass(*found)
    rows = [r for found in measured for r in found[0]]
    computed = "bfloat16 (autocast)" if autocast else "float32"
    result = new_result(rows, dispatch=args.dispatch, computed_in=computed, fit_mode=args.fit_mode,
                        n_estimators=args.estimators, auto_rule=mha_cupy.tabpfn.AUTO_RULE)
    lines = header(f"TabPFNClassifier (TabPFN-3.5, random weights), {args.fit_mode}, {computed}, {args.dispatch} "
                   "dispatch", result,
                   f"TabPFN's defaults but n_estimators={args.estimators}; {args.features} features; median of "
                   f"{args.repeats} predict(s); peak = growth of the resident peak over a predict, in a pass of its own")
    lines += ["| train rows | test rows | TabPFN s | auto s | all s | auto / TabPFN | all / TabPFN | "
              "peak MiB TabPFN / auto / all | calls taken auto / all |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['train_rows']} | {r['test_rows']} | {r['tabpfn']['median_s']:.2f} | {r['auto']['median_s']:.2f} | "
              f"{r['all']['median_s']:.2f} | {r['auto']['vs_tabpfn']:.2f} | {r['all']['vs_tabpfn']:.2f} | "
              f"{' / '.join(format(r[m].get('peak_growth_mib', float('nan')), '.0f') for m in MODES)} | "
              f"{r['auto']['calls_taken']} / {r['all']['calls_taken']} |" for r in rows]
    kind = f"tabpfn-estimator-{args.fit_mode.replace('_', '-')}-{args.precision}-{args.dispatch}"
    write_result(result, kind, args.out, lines)
    return 0


def _write_invariance(rows: list[dict], args) -> int:
    result = new_result(rows, dispatch=args.dispatch, fit_mode=args.fit_mode, precision=args.precision,
                        n_estimators=args.estimators)
    lines = header(f"TabPFNClassifier (TabPFN-3.5, random weights): test row 0 alone and among {args.among}, "
                   f"{args.fit_mode}, precision {args.precision}", result)
    lines += ["| path | train rows | bitwise equal | max abs difference | first differing module |", "|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['train_rows']} | {r['bitwise_equal']} | {r['max_abs_difference']:.2g} | "
              f"{r.get('first_differing_module', '-')} ({r.get('its_type', '-')}, {r.get('its_max_abs_difference', 0):.2g}) |"
              for r in rows]
    write_result(result, f"tabpfn-estimator-invariance-{args.fit_mode.replace('_', '-')}-{args.precision}", args.out,
                 lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
