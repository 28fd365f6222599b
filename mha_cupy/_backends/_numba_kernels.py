"""The numba kernels themselves (imported by ``_numba.load`` only where numba is installed). Module-level
functions, so that numba's on-disk cache serves them (a process's first call then takes ~0.4 s, 1.2 s when
compiling). See ``_numba`` for what each computes and why.
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np

f32, i32 = np.float32, np.int32
log2e, magic = f32(1.4426950408889634), f32(12582912.0)  # magic = 1.5 * 2**23: x + magic - magic rounds x
ln2_hi, ln2_lo = f32(0.693359375), f32(-2.12194440e-4)
c0, c1, c2, c3, c4, c5 = (f32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                                           4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))
lowest = f32(-87.33654)  # exp(x) below this is under float32's smallest normal: 0
one, zero, neg_inf = f32(1.0), f32(0.0), f32(-np.inf)


# FMA contraction only: reassociation would merge the two parts of ln 2.
@numba.njit(nogil=True, cache=True, fastmath={"contract"})
def exp_row(row: Any, shift: Any) -> None:  # pragma: no cover - compiled
    """row[j] <- exp(row[j] - shift), the power of two put into the exponent bits."""
    for j in range(row.shape[0]):
        x = row[j] - shift
        n = (x * log2e + magic) - magic
        r = x - n * ln2_hi - n * ln2_lo
        p = ((((c0 * r + c1) * r + c2) * r + c3) * r + c4) * r + c5
        power = i32((i32(n) + i32(127)) << i32(23)).view(np.float32)
        row[j] = zero if x < lowest else (p * r * r + r + one) * power  # NaN fails x < lowest: stays NaN


@numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract", "nsz"})
def row_sum(row: Any) -> Any:  # pragma: no cover - compiled
    total = zero
    for j in range(row.shape[0]):
        total += row[j]
    return total


@numba.njit(nogil=True, cache=True)
def order_key(bits: Any) -> Any:  # pragma: no cover - compiled
    """The int32 whose order is the order of the float32 with these bits (its own inverse)."""
    return i32(bits ^ ((bits >> i32(31)) & i32(0x7FFFFFFF)))


@numba.njit(nogil=True, cache=True)
def row_max(row: Any, start: Any) -> Any:  # pragma: no cover - compiled
    # Compared as integers: LLVM vectorises an integer max, not a float one without no-NaN flags. A NaN
    # (positive) orders above +inf and comes out as the maximum.
    keys = row.view(np.int32)
    best = order_key(np.float32(start).view(np.int32))
    for j in range(keys.shape[0]):
        key = order_key(keys[j])
        best = key if key > best else best
    return i32(order_key(best)).view(np.float32)


@numba.njit(nogil=True, cache=True)
def softmax_chunk(scores: Any, m: Any, l: Any, acc: Any) -> None:  # pragma: no cover - compiled
    """One key chunk of the online softmax, in place: ``scores [R, s]`` -> probabilities ``exp(scores - m')``,
    ``m [R]`` -> ``m' = max(m, rowmax)``, ``l [R]`` -> ``l exp(m - m') + rowsum``, ``acc [R, V]`` -> ``acc exp(m - m')``
    (``m'`` taken as 0 where it is ``-inf``: rows with nothing visible yet stay 0)."""
    for r in range(scores.shape[0]):
        row = scores[r]
        m_new = row_max(row, m[r])
        shift = zero if m_new == neg_inf else m_new
        alpha = f32(math.exp(m[r] - shift))
        exp_row(row, shift)
        l[r] = l[r] * alpha + row_sum(row)
        m[r] = m_new
        for c in range(acc.shape[1]):
            acc[r, c] *= alpha


@numba.njit(nogil=True, cache=True)
def matmul_fixed(a: Any, b: Any, out: Any) -> None:  # pragma: no cover - compiled
    """``out[p] = a[p] @ b[p]`` for 3-D arrays, each element summed in order of the inner index, no FMA."""
    for p in range(a.shape[0]):
        for i in range(a.shape[1]):
            for j in range(out.shape[2]):
                out[p, i, j] = 0.0
            for k in range(a.shape[2]):
                a_ik = a[p, i, k]
                for j in range(out.shape[2]):
                    out[p, i, j] += a_ik * b[p, k, j]
