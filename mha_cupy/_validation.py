"""Shape, dtype and keyword checks shared by the public functions.

Every message names the argument, what was expected and what came.
"""

from __future__ import annotations

from typing import Any, Sequence

from ._namespace import dtype_name, is_float_dtype

__all__ = [
    "check_shape_and_dtype",
    "check_positive_int",
    "check_optional_positive_int",
    "check_probability",
    "check_bool",
    "shape_str",
]


def shape_str(shape: Sequence[Any]) -> str:
    """``[2, 4, 32]`` for a shape tuple; ``None`` entries print as ``*``."""
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def check_shape_and_dtype(
    x: Any,
    name: str,
    expected: Sequence[int | None],
    *,
    legend: str | None = None,
    dtype: Any = None,
    xp: Any,
) -> None:
    """Check that ``x`` has exactly ``len(expected)`` dimensions matching ``expected``.

    ``None`` in ``expected`` accepts any size. ``legend`` names the axes for the
    message (e.g. ``"[batch, q_len, heads, d_k]"``). ``dtype``, when given, must
    equal ``x.dtype``; otherwise ``x`` must be of a real floating dtype.
    """
    shape = tuple(x.shape)
    axes = f" {legend}" if legend else ""
    if len(shape) != len(expected):
        msg = f"{name} must have {len(expected)} dimensions{axes}, shape {shape_str(expected)}, got shape {shape_str(shape)}"
        raise ValueError(msg)
    for got, want in zip(shape, expected):
        if want is not None and got != want:
            msg = f"{name} must have shape {shape_str(expected)}{axes}, got shape {shape_str(shape)}"
            raise ValueError(msg)
    check_dtype(x, name, dtype, xp=xp)


def check_dtype(x: Any, name: str, dtype: Any = None, *, xp: Any) -> None:
    """``x.dtype`` must equal ``dtype`` (or be real floating when ``dtype`` is None)."""
    if dtype is not None:
        if x.dtype != dtype:
            msg = f"{name} must have dtype {dtype_name(dtype)}, got {dtype_name(x.dtype)} (no implicit casts)"
            raise TypeError(msg)
    elif not is_float_dtype(x.dtype, xp):
        msg = f"{name} must have a real floating dtype, got {dtype_name(x.dtype)}"
        raise TypeError(msg)


def check_positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    """``value`` must be an int (not bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        msg = f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}"
        raise TypeError(msg)
    if value < minimum:
        msg = f"{name} must be an int >= {minimum}, got {value}"
        raise ValueError(msg)
    return value


def check_optional_positive_int(value: Any, name: str, *, minimum: int = 1) -> int | None:
    """Like ``check_positive_int`` but ``None`` passes."""
    return None if value is None else check_positive_int(value, name, minimum=minimum)


def check_probability(value: Any, name: str) -> float:
    """``value`` must be a real number in ``[0, 1]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        msg = f"{name} must be a float in [0, 1], got {type(value).__name__} {value!r}"
        raise TypeError(msg)
    if not 0.0 <= value <= 1.0:
        msg = f"{name} must be a float in [0, 1], got {value}"
        raise ValueError(msg)
    return float(value)


def check_bool(value: Any, name: str) -> bool:
    """``value`` must be a Python bool."""
    if not isinstance(value, bool):
        msg = f"{name} must be a bool, got {type(value).__name__} {value!r}"
        raise TypeError(msg)
    return value
