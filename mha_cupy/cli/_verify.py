"""``mha-cupy verify``: replay tabpfn 2.2.1's reference fixtures on every usable backend."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ._report import EXIT_MISMATCH, EXIT_OK, CliError, Report, note, progress, table


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    from .._backends import BACKEND_NAMES, FLOAT_DTYPES

    fixtures = ", ".join(f"{n} {FLOAT_DTYPES[n].tolerance:.0e}".replace("e-0", "e-")
                         for n in ("float64", "float32"))  # the fixtures' dtypes
    p = sub.add_parser("verify", parents=parents, help="replay the tabpfn reference fixtures (exit 1 on a mismatch)",
                       description="Replay the reference fixtures made by tabpfn 2.2.1 (by default those installed "
                       "with mha_cupy) on each backend and compare every output and cache within the dtype's "
                       f"tolerance ({fixtures}, relative to max(1, the largest absolute reference value)).")
    p.add_argument("--xp", nargs="+", action="extend", choices=BACKEND_NAMES, metavar="NAME", default=None,
                   help=f"backends to run on, from {', '.join(BACKEND_NAMES)} (default: every usable one; "
                   "the others are listed with the reason)")
    p.add_argument(
        "--fixtures",
        default=None,
        metavar="DIR",
        help="folder holding manifest.json and the .npz files (default: the fixtures installed with mha_cupy)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> Report:
    from .._reference import packaged_fixtures

    directory = packaged_fixtures() if args.fixtures is None else Path(args.fixtures)
    if not (directory / "manifest.json").is_file():
        msg = (f"no manifest.json in {directory}; pass --fixtures DIR, or leave it out for the fixtures installed "
               "with mha_cupy")
        raise CliError(msg)
    names, skipped = _backends(args.xp)
    if "jax" in names:
        note("verify: JAX compiles for every new shape: 10-30 s of the run on 2 cores (the first run the longest)")
    results = {}
    for name in progress(names, len(names), "verify", lines=False):  # its own line per backend follows
        start = time.perf_counter()
        results[name] = _replay(directory, name)
        failed = sum(not r["ok"] for r in results[name])
        note(f"verify: {name}: {len(results[name]) - failed} passed, {failed} failed "
             f"({time.perf_counter() - start:.1f} s)")
    failed = {name: sum(not r["ok"] for r in rows) for name, rows in results.items()}
    data = {"fixtures": str(directory), "results": results, "skipped": skipped, "failed": failed,
            "ok": not any(failed.values())}
    return Report(EXIT_MISMATCH if any(failed.values()) else EXIT_OK, data, _text(data))


def _backends(requested: list[str] | None) -> tuple[list[str], dict[str, str]]:
    from .._backends import BACKEND_NAMES, BackendUnavailableError, resolve_backend

    names, skipped = [], {}
    for name in requested or BACKEND_NAMES:
        try:
            resolve_backend(name).enable_float64()  # the fixtures include float64 cases
            names.append(name)
        except BackendUnavailableError as exc:
            if requested:
                raise CliError(str(exc)) from exc
            skipped[name] = str(exc)
    return names, skipped


def _replay(directory: Path, name: str) -> list[dict[str, Any]]:
    from .._reference import verify_fixtures

    return verify_fixtures(directory, xp=name)


def _text(data: dict[str, Any]) -> str:
    results = data["results"]
    names = list(results)
    first = results[names[0]] if names else []
    rows = []
    for i, r in enumerate(first):
        cells = [f"{results[n][i]['error']:.1e}" + ("" if results[n][i]["ok"] else " FAIL") for n in names]
        rows.append([f"{r['case_id']}:{r['key']}", r["dtype"], f"{r['tolerance']:.0e}", *cells])
    lines = [table(["fixture:array", "dtype", "tolerance", *names], rows), ""]
    lines += [f"{n}: {len(results[n]) - data['failed'][n]} passed, {data['failed'][n]} failed" for n in names]
    lines += [f"{n}: not run ({why})" for n, why in data["skipped"].items()]
    return "\n".join(lines)
