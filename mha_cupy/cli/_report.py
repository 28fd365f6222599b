"""What every command shares: its result, its errors, progress and list-valued options."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Iterable, Iterator

#: Exit codes, for scripts. Argparse's own usage errors also exit with 2.
EXIT_OK, EXIT_MISMATCH, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A one-line error for the user (exit code 2): bad option values, missing files, unusable backends."""


@dataclass
class Report:
    """A command's outcome: its exit code, its JSON-ready data and its text for a terminal."""

    code: int
    data: dict[str, Any] = field(default_factory=dict)
    text: str = ""


def int_list(text: str) -> list[int]:
    """``"1024,4096"`` -> ``[1024, 4096]``: positive integers, for sweeps."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        msg = f"expected positive integers separated by commas, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return values


def progress(items: Iterable[Any], total: int, desc: str, *, lines: bool = True) -> Iterator[Any]:
    """``items`` with a tqdm progress bar on stderr when tqdm is installed and stderr is a terminal; without tqdm,
    a line on stderr per item done (stdout keeps the result), unless ``lines`` is False (the caller writes its
    own)."""
    try:
        from tqdm import tqdm
    except ImportError:
        start = time.perf_counter()
        for i, item in enumerate(items, 1):
            yield item
            if lines and total > 1:
                note(f"{desc}: {i}/{total} done ({time.perf_counter() - start:.0f} s)")
        return
    yield from tqdm(items, total=total, desc=desc, file=sys.stderr, disable=None, leave=False)


def note(line: str) -> None:
    """A progress line on stderr, at once (stdout keeps the result: text, or one JSON object)."""
    print(line, file=sys.stderr, flush=True)


def table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def mib(n_bytes: float | None) -> str:
    return "n/a" if n_bytes is None else f"{n_bytes / 2**20:.1f} MiB"
