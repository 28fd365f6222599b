"""What every benchmark records beside its figures: the machine and the library versions."""

from __future__ import annotations

import contextlib
import os
import platform
from importlib import metadata
from pathlib import Path


def versions() -> dict:
    import array_api_compat
    import numpy

    import mha_cupy

    v = {"python": platform.python_version(), "numpy": numpy.__version__, "array_api_compat": array_api_compat.__version__,
         "mha_cupy": mha_cupy.__version__}
    try:
        import torch

        v["torch"] = torch.__version__
        v["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    with contextlib.suppress(metadata.PackageNotFoundError):
        v["tabpfn"] = metadata.version("tabpfn")
    try:
        blas = numpy.show_config(mode="dicts")["Build Dependencies"]["blas"]
        v["numpy_blas"] = f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # noqa: BLE001
        pass
    return v


def machine() -> dict:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = _mem_total()
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1), "platform": platform.platform(),
            "avx512f": " avx512f" in Path("/proc/cpuinfo").read_text(), **dispatch()}


def dispatch() -> dict:
    """What runs on this CPU: NumPy's SIMD targets in use, OpenBLAS's core, numba's target and the settings that
    chose them (see ``--dispatch``)."""
    from mha_cupy._backends._dispatch import describe

    return {**describe(), _DISPATCH_MARK: os.environ.get(_DISPATCH_MARK, "native")}


#: ``--dispatch`` choices: what the machine offers, or an AVX2 machine's code paths on an AVX-512 one.
DISPATCHES = ("native", "avx2")
_DISPATCH_MARK = "MHA_CUPY_BENCH_DISPATCH"


def add_dispatch_argument(parser) -> None:
    parser.add_argument("--dispatch", choices=DISPATCHES, default="native",
                        help="native: the CPU's own code paths; avx2: NumPy, OpenBLAS, numba and torch held to AVX2 "
                             "(no AVX-512), as on an ordinary AVX2 machine (default native)")


def apply_dispatch(name: str) -> None:
    """Re-run this process under ``name``'s settings unless they are in force: they must be set before NumPy,
    OpenBLAS, numba or torch load. ``avx2`` disables NumPy's AVX-512 targets (``NPY_DISABLE_CPU_FEATURES``),
    picks OpenBLAS's Haswell kernels (``OPENBLAS_CORETYPE``), compiles numba for Haswell without AVX-512
    and holds torch (ATen, MKL, oneDNN) to AVX2."""
    import sys

    if name == "native" or os.environ.get(_DISPATCH_MARK) == name:
        return
    env = {**os.environ, **_avx2_settings(), _DISPATCH_MARK: name}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def _avx2_settings() -> dict:
    from mha_cupy._backends._dispatch import AVX2_TORCH, without_avx512

    return {**without_avx512(), "OPENBLAS_CORETYPE": "Haswell", **AVX2_TORCH}


def _mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def new_result(rows: list, **extra) -> dict:
    """A result record: date, command, machine and versions beside the rows (and ``extra`` fields)."""
    import datetime as _dt
    import sys

    now = _dt.datetime.now(_dt.UTC)
    return {"date": now.isoformat(timespec="seconds"), "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": machine(), "versions": versions(), **extra, "rows": rows}


def header(title: str, result: dict, *notes: str) -> list[str]:
    """The opening lines of a results file: title with date, command, machine, versions, notes."""
    return [f"# {title} ({result['date']})", "", f"- command: `{result['command']}`", f"- machine: {result['machine']}",
            f"- versions: {result['versions']}", *(f"- {n}" for n in notes), ""]


def write_result(result: dict, kind: str, out: str, lines: list[str]) -> Path:
    """``<out>/<kind>-<date>.json`` and ``.md``; returns the common stem."""
    import datetime as _dt
    import json

    stamp = _dt.datetime.fromisoformat(result["date"])
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{kind}-{stamp:%Y-%m-%dT%H%M}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and .md")
    return stem


def median_time(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn``, after one warm-up call."""
    import statistics
    import time

    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
