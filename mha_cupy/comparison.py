"""``mha_cupy.compare``: how far one array is from a reference, for arrays of any library and device.

The one place where arrays are moved to the host on purpose: both sides are
copied to NumPy and compared in float64, never as part of a computation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy

from ._backends import FLOAT_DTYPES, backend_of, dtype_name, to_numpy
from ._validation import keyword_hints

__all__ = ["TOLERANCE", "Comparison", "compare", "tolerance"]

#: Max abs error allowed, relative to ``max(1, max |reference|)``, by dtype name (``FloatDtype.tolerance``).
TOLERANCE = {name: d.tolerance for name, d in FLOAT_DTYPES.items()}


def tolerance(dtype: Any) -> float:
    """The parity tolerance for ``dtype`` (a dtype of any library, or its name)."""
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    if name not in TOLERANCE:
        msg = f"dtype must be one of the floating dtypes {sorted(TOLERANCE)}, got {dtype!r}"
        raise TypeError(msg)
    return TOLERANCE[name]


@dataclass(frozen=True)
class Comparison:
    """The outcome of :func:`compare`; every error is measured on the host in float64.

    Attributes
    ----------
    max_abs_error : float
        ``max |actual - reference|``; ``inf`` where a NaN or an infinity differs.
    max_rel_error : float
        ``max |actual - reference| / |reference|`` over the elements (``inf`` where the
        reference is 0 and the actual value is not).
    scaled_error : float
        ``max_abs_error / max(1, max |reference|)``: the project's parity measure.
    ulp_error : float
        The largest distance in units in the last place of ``precision``: how many
        representable numbers of that dtype lie between the two values, both rounded to it.
    worst_index : tuple of int
        Where ``max_abs_error`` occurs (the first such element); ``()`` when empty.
    tolerance : float
        What ``scaled_error`` is checked against: ``rtol + atol / max(1, max |reference|)``.
    rtol, atol : float
        The tolerances used; ``rtol`` defaults to :func:`tolerance` of ``precision``, ``atol`` to 0.
    scale : float
        ``max(1, max |reference|)`` over the finite reference values.
    ok : bool
        ``scaled_error <= tolerance``; never true when a NaN is involved.
    shape : tuple of int
        The shape of both arrays.
    actual_dtype, reference_dtype, precision : str
        The two dtypes, and the lower of their precisions.
    """

    max_abs_error: float
    max_rel_error: float
    scaled_error: float
    ulp_error: float
    worst_index: tuple[int, ...]
    tolerance: float
    rtol: float
    atol: float
    scale: float
    ok: bool
    shape: tuple[int, ...]
    actual_dtype: str
    reference_dtype: str
    precision: str

    def __str__(self) -> str:
        verdict = (
            f"ok: scaled error {self.scaled_error:.2e} <= "
            if self.ok
            else f"FAIL: scaled error {self.scaled_error:.2e} > "
        )
        remark = "; both largest near zero, where the scaled error is the measure" if self.max_abs_error else ""
        return (f"{verdict}{self.tolerance:.1e}; max abs {self.max_abs_error:.2e} at {list(self.worst_index)}, "
                f"over all elements, max rel {self.max_rel_error:.2e} and {self.ulp_error:.4g} ulp ({self.precision}"
                f"{remark}); {self.actual_dtype} vs {self.reference_dtype} {list(self.shape)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values only (JSON-ready: tuples become lists, infinities stay floats)."""
        d = asdict(self)
        d["worst_index"], d["shape"] = list(self.worst_index), list(self.shape)
        return d


@keyword_hints
def compare(actual: Any, reference: Any, *, rtol: float | None = None, atol: float | None = None) -> Comparison:
    """Compare ``actual`` with ``reference``, arrays of any libraries and devices, on the host.

    Parameters
    ----------
    actual, reference : array
        Floating arrays of one shape (float64, float32, float16 or bfloat16); they may come
        from different libraries and devices. Both are copied to the host here.
    rtol : float, optional
        Allowed ``scaled_error``. Default: :func:`tolerance` of the lower of the two precisions.
    atol : float, optional
        Allowed absolute error on top of ``rtol * max(1, max |reference|)``. Default 0.

    Returns
    -------
    Comparison
        The errors, where the worst one is, the tolerance used and ``ok``.

    Examples
    --------
    >>> import numpy as np
    >>> import mha_cupy
    >>> reference = np.linspace(-2.0, 2.0, 5)
    >>> c = mha_cupy.compare(reference.astype(np.float32), reference)
    >>> c.ok, c.precision, c.tolerance
    (True, 'float32', 1e-05)
    >>> mha_cupy.compare(reference + 1e-3, reference).ok        # float64 is held to 1e-10
    False
    >>> mha_cupy.compare(reference + 1e-3, reference, rtol=1e-2).ok
    True
    """
    precisions = [_precision(x, name) for x, name in ((actual, "actual"), (reference, "reference"))]
    precision = min(precisions, key=lambda name: FLOAT_DTYPES[name].mantissa_bits)
    rtol = TOLERANCE[precision] if rtol is None else _check_tol(rtol, "rtol")
    atol = 0.0 if atol is None else _check_tol(atol, "atol")
    a, r = (numpy.asarray(to_numpy(x), dtype=numpy.float64) for x in (actual, reference))
    if a.shape != r.shape:
        msg = f"actual and reference must have one shape, got actual {a.shape} and reference {r.shape}"
        raise ValueError(msg)
    abs_err = _abs_error(a, r)
    worst = tuple(int(i) for i in numpy.unravel_index(numpy.argmax(abs_err), a.shape)) if a.size else ()
    max_abs = float(abs_err.max()) if a.size else 0.0
    scale = max(1.0, float(numpy.max(numpy.abs(r), initial=0.0, where=numpy.isfinite(r))))
    scaled = max_abs / scale
    limit = rtol + atol / scale
    return Comparison(max_abs_error=max_abs, max_rel_error=_max_rel_error(abs_err, r), scaled_error=scaled,
                      ulp_error=_max_ulp(a, r, precision), worst_index=worst, tolerance=limit, rtol=rtol, atol=atol,
                      scale=scale, ok=bool(scaled <= limit), shape=a.shape, actual_dtype=precisions[0],
                      reference_dtype=precisions[1], precision=precision)


def _precision(x: Any, name: str) -> str:
    dtype = backend_of(x, names=(name,)).dtype_name(x.dtype)
    if dtype not in FLOAT_DTYPES:
        msg = f"{name} must be a floating array ({', '.join(FLOAT_DTYPES)}), got dtype {dtype}"
        raise TypeError(msg)
    return dtype


def _check_tol(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        msg = f"{name} must be a finite number >= 0, got {type(value).__name__} {value!r}"
        raise TypeError(msg)
    if not (math.isfinite(value) and value >= 0):
        msg = f"{name} must be a finite number >= 0, got {value!r}"
        raise ValueError(msg)
    return float(value)


def _abs_error(a: numpy.ndarray, r: numpy.ndarray) -> numpy.ndarray:
    # Equal values (infinities included) differ by 0; NaNs and unequal infinities by inf.
    with numpy.errstate(invalid="ignore"):
        err = numpy.abs(a - r)
    err[a == r] = 0.0
    err[numpy.isnan(err)] = numpy.inf
    return err


def _max_rel_error(abs_err: numpy.ndarray, r: numpy.ndarray) -> float:
    if not abs_err.size:
        return 0.0
    with numpy.errstate(divide="ignore", invalid="ignore"):
        rel = abs_err / numpy.abs(r)
    rel[abs_err == 0] = 0.0
    rel[numpy.isnan(rel)] = numpy.inf
    return float(rel.max())


def _max_ulp(a: numpy.ndarray, r: numpy.ndarray, precision: str) -> float:
    """How many ``precision`` numbers lie between ``a`` and ``r`` at most, both rounded to ``precision``."""
    if not a.size:
        return 0.0
    if numpy.isnan(a).any() or numpy.isnan(r).any():
        return math.inf
    info = FLOAT_DTYPES[precision]
    dtype = numpy.dtype(info.ulp_host)
    itype = numpy.dtype(f"int{8 * dtype.itemsize}")
    ordered = [_ordered_bits(x.astype(dtype), itype) for x in (a, r)]
    ulps = numpy.abs(ordered[0].astype(numpy.float64) - ordered[1]).max()  # float: +inf - -inf overflows int64
    return float(ulps) / info.ulp_units


def _ordered_bits(x: numpy.ndarray, itype: Any) -> numpy.ndarray:
    # Sign-magnitude bits mapped onto a line where adjacent floats are adjacent integers (+0 == -0).
    bits = x.view(itype).astype(numpy.int64)
    magnitude = bits & numpy.int64(numpy.iinfo(itype).max)
    return numpy.where(bits < 0, -magnitude, magnitude)
