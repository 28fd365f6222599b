"""Testing tools: the project's tolerances and an ``assert_close`` for arrays of any library.

Not imported by ``import mha_cupy``. Values are compared by :func:`mha_cupy.compare`,
on the host in float64 (an explicit copy, never part of a computation).
"""

from __future__ import annotations

from typing import Any

from ._backends import backend_of, device_of
from .comparison import TOLERANCE, compare, tolerance

__all__ = ["TOLERANCE", "tolerance", "scaled_error", "assert_close", "compare"]


def scaled_error(actual: Any, desired: Any) -> float:
    """``max |actual - desired| / max(1, max |desired|)``, computed in float64 on the host (see :func:`compare`)."""
    return compare(actual, desired, rtol=0.0).scaled_error


def assert_close(actual: Any, desired: Any, *, rtol: float | None = None, atol: float | None = None,
                 what: str = "result") -> float:
    """Assert that ``actual`` equals ``desired`` within the project's tolerance; return the scaled error.

    Like SciPy's ``xp_assert_close``, it first fails when the two differ in
    namespace, device, dtype or shape. Then ``max |actual - desired|`` must be
    at most ``atol + rtol * max(1, max |desired|)``, with ``rtol`` defaulting
    to ``tolerance(dtype)`` and ``atol`` to 0. NaNs never compare equal.

    Examples
    --------
    >>> import numpy as np
    >>> from mha_cupy.testing import assert_close
    >>> x = np.zeros(4)
    >>> assert_close(x + 1e-12, x)                # returns the scaled error
    1e-12
    >>> assert_close(x.astype(np.float32), x)
    Traceback (most recent call last):
    ...
    AssertionError: result: dtype float32, desired float64
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
    c = compare(actual, desired, rtol=rtol, atol=atol)
    if not c.ok:
        raise AssertionError(f"{what}: max abs error {c.max_abs_error:.3e} > {c.tolerance * c.scale:.3e} "
                             f"(scaled error {c.scaled_error:.3e}, rtol {c.rtol:.1e}, atol {c.atol:.1e}; "
                             f"worst at {list(c.worst_index)}, {c.ulp_error:.4g} ulp)")
    return c.scaled_error
