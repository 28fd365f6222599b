"""Testing tools: the project's tolerances and an ``assert_close`` for arrays of any library.

Not imported by ``import mha_cupy``; values are compared on the host in
float64 (an explicit copy, never part of a computation).
"""

from __future__ import annotations

from typing import Any

import numpy

from ._backends import backend_of, device_of, dtype_name, to_numpy

__all__ = ["TOLERANCE", "tolerance", "scaled_error", "assert_close"]

#: Max abs error allowed, relative to ``max(1, max |reference|)``, by dtype name. Half
#: precisions compute in float32, so two units of their epsilon (2**-10, 2**-7) cover the
#: rounding of inputs, projections and output.
TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "float16": 2 * 2.0**-10, "bfloat16": 2 * 2.0**-7}


def tolerance(dtype: Any) -> float:
    """The parity tolerance for ``dtype`` (a dtype of any library, or its name)."""
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    if name not in TOLERANCE:
        msg = f"dtype must be one of the floating dtypes {sorted(TOLERANCE)}, got {dtype!r}"
        raise TypeError(msg)
    return TOLERANCE[name]


def scaled_error(actual: Any, desired: Any) -> float:
    """``max |actual - desired| / max(1, max |desired|)``, computed in float64 on the host."""
    a = numpy.asarray(to_numpy(actual), dtype=numpy.float64)
    d = numpy.asarray(to_numpy(desired), dtype=numpy.float64)
    if a.shape != d.shape:
        msg = f"shapes differ: actual {tuple(a.shape)}, desired {tuple(d.shape)}"
        raise ValueError(msg)
    if d.size == 0:
        return 0.0
    return float(numpy.max(numpy.abs(a - d))) / max(1.0, float(numpy.max(numpy.abs(d))))


def assert_close(actual: Any, desired: Any, *, rtol: float | None = None, atol: float | None = None,
                 what: str = "result") -> float:
    """Assert that ``actual`` equals ``desired`` within the project's tolerance; return the scaled error.

    Like SciPy's ``xp_assert_close``, it first fails when the two differ in
    namespace, device, dtype or shape. Then ``max |actual - desired|`` must be
    at most ``atol + rtol * max(1, max |desired|)``, with ``rtol`` defaulting
    to ``tolerance(dtype)`` and ``atol`` to 0. NaNs never compare equal.
    """
    a_be = backend_of(actual, names=("actual",))
    d_be = backend_of(desired, names=("desired",))
    if a_be.xp is not d_be.xp:
        raise AssertionError(f"{what}: namespace {a_be.name}, desired {d_be.name}")
    if device_of(actual) != device_of(desired):
        raise AssertionError(f"{what}: device {device_of(actual)}, desired {device_of(desired)}")
    if actual.dtype != desired.dtype:
        raise AssertionError(f"{what}: dtype {a_be.dtype_name(actual.dtype)}, desired {a_be.dtype_name(desired.dtype)}")
    if tuple(actual.shape) != tuple(desired.shape):
        raise AssertionError(f"{what}: shape {tuple(actual.shape)}, desired {tuple(desired.shape)}")
    limit_rel = tolerance(a_be.dtype_name(actual.dtype)) if rtol is None else rtol
    err = scaled_error(actual, desired)
    d = numpy.asarray(to_numpy(desired), dtype=numpy.float64)
    scale = max(1.0, float(numpy.max(numpy.abs(d)))) if d.size else 1.0
    limit = (atol or 0.0) + limit_rel * scale
    if not err * scale <= limit:
        raise AssertionError(f"{what}: max abs error {err * scale:.3e} > {limit:.3e} "
                             f"(scaled error {err:.3e}, rtol {limit_rel:.1e}, atol {atol or 0.0:.1e})")
    return err
