"""The dtypes mha_cupy knows, by name: one table that the adapters, ``compare``, the layer's cache, the TabPFN
backend and the command line read (a library's own dtype objects come from its adapter)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FLOAT_DTYPES", "FloatDtype", "HALF_NAMES", "QUANTIZED_MAX"]


@dataclass(frozen=True)
class FloatDtype:
    """One floating dtype."""

    name: str
    #: Significand bits without the implicit one: orders precisions.
    mantissa_bits: int
    #: Parity tolerance: max abs error relative to ``max(1, max |reference|)``. Half precisions compute in
    #: float32, so two units of their epsilon (2**-10, 2**-7) cover the rounding of inputs, projections and output.
    tolerance: float
    #: NumPy's dtype whose bits, read as integers, count this dtype's units in the last place, and how many of
    #: those make one of this dtype's (bfloat16 is float32's upper half: 2**16).
    ulp_host: str
    ulp_units: int = 1


FLOAT_DTYPES = {d.name: d for d in (
    FloatDtype("float64", 52, 1e-10, "float64"),
    FloatDtype("float32", 23, 1e-5, "float32"),
    FloatDtype("float16", 10, 2 * 2.0**-10, "float16"),
    FloatDtype("bfloat16", 7, 2 * 2.0**-7, "float32", 2**16),
)}
#: The half precisions: computed in float32 (``Backend.compute_dtype``), not offered by every library.
HALF_NAMES = ("float16", "bfloat16")
#: Storage dtypes of quantized keys and values (TabPFN 9's KV caches) and the largest magnitude each holds:
#: int8 symmetric in [-127, 127], float8_e4m3fn its finite range.
QUANTIZED_MAX = {"int8": 127.0, "float8_e4m3fn": 448.0}
