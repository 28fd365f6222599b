"""Memory budgets: parsed, per-device defaults, ``get``/``set_memory_budget``.

One budget bounds the working set of the attention loop of one call: the
score tiles and their temporaries plus the per-row accumulators of the blocks
in flight. Inputs, the output and the projections are not counted. Unless set
with ``set_memory_budget``, each device has its own default (the library
adapter's ``default_memory_budget``: 32 MiB on CPUs, a share of the free memory
on accelerators).
"""

from __future__ import annotations

import re
from typing import Any

from ._backends import Backend, resolve_backend
from ._validation import check_positive_int, keyword_hints

__all__ = ["get_memory_budget", "set_memory_budget", "parse_memory_budget", "resolve_memory_budget"]

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")

#: Set by ``set_memory_budget``; None: each device's default.
_budget_override: int | None = None


def parse_memory_budget(value: Any, name: str = "memory_budget") -> int:
    """Bytes from an integral scalar or a string such as ``"256MB"`` (10**6) or ``"32MiB"`` (2**20)."""
    if not isinstance(value, str):
        return check_positive_int(value, name)
    match = _BUDGET_RE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        msg = f"{name} must look like '256MB', '64MiB' or '1GB' (units {sorted(u for u in _UNITS if u)}), got {value!r}"
        raise ValueError(msg)
    amount = float(match.group(1)) * _UNITS[unit]
    if not 1 <= amount < 2**63:
        msg = f"{name} must be between 1 byte and 2**63 bytes, got {value!r}"
        raise ValueError(msg)
    return int(amount)


def resolve_memory_budget(value: Any, *, be: Backend, device: Any) -> int:
    """Bytes of one call's budget: ``value`` if given, else the set default, else the device's default."""
    if value is not None:
        return parse_memory_budget(value)
    if _budget_override is not None:
        return _budget_override
    return be.default_memory_budget(device)


@keyword_hints
def get_memory_budget(xp: Any = None, device: Any = None) -> int:
    """The budget in bytes that a call on ``xp`` (default NumPy) and ``device`` uses when it names none.

    That is the value given to ``set_memory_budget`` if any, else the device's
    default: 32 MiB on CPUs, a quarter of the free memory on accelerators.

    Examples
    --------
    >>> import mha_cupy
    >>> mha_cupy.get_memory_budget() // 2**20              # MiB, on the CPU
    32
    >>> previous = mha_cupy.set_memory_budget("8MiB")      # every later call that names none
    >>> mha_cupy.get_memory_budget() // 2**20
    8
    >>> mha_cupy.set_memory_budget(previous)               # back to the per-device defaults
    8388608
    """
    be = resolve_backend(xp)
    return resolve_memory_budget(None, be=be, device=be.default_device() if device is None else device)


@keyword_hints
def set_memory_budget(value: int | str | None) -> int | None:
    """Set the budget of every later call that names none, on every device; ``None`` restores the
    per-device defaults. Returns the previous setting (None when the defaults were in force)."""
    global _budget_override
    previous = _budget_override
    _budget_override = None if value is None else parse_memory_budget(value)
    return previous
