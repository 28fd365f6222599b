"""Peak resident memory of one call, measured in a fresh process (Linux: ``/proc/self``)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any
from collections.abc import Callable

from ._report import CliError

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def supported() -> bool:
    """Whether this OS lets a process reset and read its peak RSS (Linux does)."""
    return _STATUS.is_file() and _CLEAR_REFS.exists()


def status(field: str) -> int:
    """A byte count from ``/proc/self/status`` (``VmRSS``: resident now, ``VmHWM``: its peak since the reset)."""
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    msg = f"/proc/self/status has no {field}"
    raise RuntimeError(msg)


def peak_growth(call: Callable[[], Any]) -> int:
    """Peak RSS growth over the RSS before ``call`` (its working set and its result), in bytes.

    Only meaningful in a fresh process (use :func:`in_child`): memory freed
    earlier is handed back to the OS first (glibc), else its reuse would not
    show as growth.
    """
    _release_freed_memory()
    before = status("VmRSS")
    reset_peak()
    result = call()
    growth = status("VmHWM") - before
    del result
    return growth


def reset_peak() -> None:
    """Reset VmHWM to the current RSS."""
    _CLEAR_REFS.write_text("5")


def _release_freed_memory() -> None:
    # Pages freed earlier (the inputs' temporaries) would be reused without growing RSS and hide
    # part of the call's working set; glibc's malloc_trim hands them back to the OS first.
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the figure may then be an underestimate
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def in_child(code: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Run ``code`` in a fresh Python with ``payload`` as JSON on stdin; its last stdout line, parsed as JSON."""
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(payload), capture_output=True, text=True,
                          check=False)
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        msg = f"the memory measurement's child process failed: {tail}"
        raise CliError(msg)
    return json.loads(proc.stdout.strip().splitlines()[-1])
