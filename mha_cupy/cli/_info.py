"""``mha-cupy info``: versions, BLAS and threads, and whether each backend is usable here (or why not)."""

from __future__ import annotations

import argparse
import os
import platform
from importlib import metadata
from typing import Any

from ._report import EXIT_OK, Report, mib, table

#: Distributions whose versions matter to a bug report, by the name shown.
PACKAGES = {"numpy": ("numpy",), "array_api_compat": ("array-api-compat",), "array_api_extra": ("array-api-extra",),
            "threadpoolctl": ("threadpoolctl",), "array_api_strict": ("array-api-strict",), "torch": ("torch",),
            "tabpfn": ("tabpfn",), "jax": ("jax",), "jaxlib": ("jaxlib",),
            "cupy": ("cupy-cuda12x", "cupy-cuda13x", "cupy-cuda11x", "cupy"), "dask": ("dask",),
            "matplotlib": ("matplotlib",), "tqdm": ("tqdm",), "numba": ("numba",), "ml_dtypes": ("ml-dtypes",)}


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("info", parents=parents, help="versions, BLAS and threads, and which backends are usable here",
                       description="Versions, BLAS and threads, and each backend: usable (device, default memory "
                       "budget, workers, dtypes) or why not. Imports every installed library, so it takes a few "
                       "seconds.")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> Report:
    from .. import __version__

    data = {"mha_cupy": __version__, "python": platform.python_version(), "platform": platform.platform(),
            "cpu_cores": os.cpu_count(), "packages": _versions(), "blas": _blas(), "backends": _backends()}
    return Report(EXIT_OK, data, _text(data))


def _versions() -> dict[str, str | None]:
    found = {}
    for shown, dists in PACKAGES.items():
        found[shown] = None
        for dist in dists:
            try:
                found[shown] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return found


def _blas() -> list[dict[str, Any]]:
    from threadpoolctl import threadpool_info

    from .._backends import resolve_backend

    resolve_backend("numpy")  # loads NumPy, whose BLAS threadpoolctl reports

    keep = ("user_api", "internal_api", "version", "num_threads", "threading_layer", "architecture")
    return [{k: lib.get(k) for k in keep} for lib in threadpool_info()]


def _backends() -> dict[str, dict[str, Any]]:
    from .._backends import BACKEND_NAMES
    return {name: _backend_row(name) for name in BACKEND_NAMES}


def _backend_row(name: str) -> dict[str, Any]:
    from .._backends import BackendUnavailableError, resolve_backend
    from .._budget import get_memory_budget

    try:
        be = resolve_backend(name)
    except BackendUnavailableError as exc:
        return {"usable": False, "reason": str(exc)}
    device = be.default_device()
    row = {
        "usable": True,
        "device": str(device),
        "cpu": be.is_cpu(device),
        "memory_budget": get_memory_budget(name, device),
        "workers": be.default_workers(device),
        "float_dtypes": sorted(be.float_dtypes()),
    }
    try:
        row.update(be.describe_device(device))
    except Exception as exc:  # noqa: BLE001 - a diagnostic command reports a broken driver instead of dying on it
        row["device_error"] = f"{type(exc).__name__}: {exc}"
    return row


def _text(data: dict[str, Any]) -> str:
    pkgs = ", ".join(f"{k} {v}" for k, v in data["packages"].items() if v)
    missing = ", ".join(k for k, v in data["packages"].items() if not v) or "none"
    blas = "; ".join(f"{b['internal_api']} {b['version']}" + (f" core {b['architecture']}" if b["architecture"] else "")
                     + f" ({b['user_api']}, {b['num_threads']} threads)" for b in data["blas"]) or "none found"
    lines = [
        f"mha-cupy {data['mha_cupy']} on Python {data['python']} ({data['platform']}), {data['cpu_cores']} CPU cores",
        f"installed: {pkgs}",
        f"not installed: {missing}",
        f"BLAS: {blas}",
    ]
    host = data["backends"]["numpy"]
    if "simd" in host:
        simd = host["simd"]
        lines.append(
            f"NumPy: SIMD baseline {' '.join(simd['baseline'])}, "
            f"dispatching {' '.join(simd['found']) or 'nothing more'}; "
            f"compiled kernels: {host['compiled_kernels']}"
        )
    lines.append("")
    usable = {n: r for n, r in data["backends"].items() if r["usable"]}
    rows = [
        [
            name,
            row["device"] + (f" ({row['name']}, {mib(row['memory_total'])})" if "name" in row else ""),
            mib(row["memory_budget"]),
            str(row["workers"]),
            " ".join(row["float_dtypes"]),
        ]
        for name, row in usable.items()
    ]
    lines.append(table(["usable", "default device", "default budget", "workers", "float dtypes"], rows))
    lines += [f"not usable: {name}: {row['reason']}" for name, row in data["backends"].items() if not row["usable"]]
    return "\n".join(lines)
