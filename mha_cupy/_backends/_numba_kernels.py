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
    """``out[p] = a[p] @ b[p]`` for 3-D arrays, each element ``((0 + a0 b0) + a1 b1) + ...`` in order of the inner
    index, each product and sum rounded (no FMA), four rows at a time (``scores_rows``)."""
    for p in range(a.shape[0]):
        if a.shape[2] == 0:
            out[p, :, :] = 0.0
            continue
        for i in range(0, a.shape[1], 4):
            scores_rows(a[p, i:], b[p], out[p, i:], min(4, a.shape[1] - i))


# -- the fused chunk: q k^T, the online softmax and p v per block of four query rows ------------------------------
# Both products add their inner index in order, each product and sum rounded (no FMA): ``matmul_fixed``'s
# arithmetic, element for element. What makes them fast is the layout, not the order: four query rows share every
# key loaded, four steps of the inner index are added per store (``(((o + a0 b0) + a1 b1) + ...)`` rounds exactly
# as four separate steps), and the vectorised loop runs over keys (q k^T) or the value size (p v).

@numba.njit(nogil=True, cache=True)
def scores4(q: Any, kt: Any, rows: Any) -> None:  # pragma: no cover - compiled
    """``rows[r, j] = sum_d q[r, d] kt[d, j]`` for ``r < 4``, ``d`` in order from 0."""
    H, s = kt.shape
    o0, o1, o2, o3 = rows[0], rows[1], rows[2], rows[3]
    k0 = kt[0]
    a0, a1, a2, a3 = q[0, 0], q[1, 0], q[2, 0], q[3, 0]
    for j in range(s):  # 0 + the first product, as matmul_fixed: -0 products give +0
        w = k0[j]
        o0[j], o1[j], o2[j], o3[j] = zero + a0 * w, zero + a1 * w, zero + a2 * w, zero + a3 * w
    d = 1
    while d + 4 <= H:
        k0, k1, k2, k3 = kt[d], kt[d + 1], kt[d + 2], kt[d + 3]
        a0, b0, c0_, e0 = q[0, d], q[0, d + 1], q[0, d + 2], q[0, d + 3]
        a1, b1, c1_, e1 = q[1, d], q[1, d + 1], q[1, d + 2], q[1, d + 3]
        a2, b2, c2_, e2 = q[2, d], q[2, d + 1], q[2, d + 2], q[2, d + 3]
        a3, b3, c3_, e3 = q[3, d], q[3, d + 1], q[3, d + 2], q[3, d + 3]
        for j in range(s):
            w0, w1, w2, w3 = k0[j], k1[j], k2[j], k3[j]
            o0[j] = o0[j] + a0 * w0 + b0 * w1 + c0_ * w2 + e0 * w3
            o1[j] = o1[j] + a1 * w0 + b1 * w1 + c1_ * w2 + e1 * w3
            o2[j] = o2[j] + a2 * w0 + b2 * w1 + c2_ * w2 + e2 * w3
            o3[j] = o3[j] + a3 * w0 + b3 * w1 + c3_ * w2 + e3 * w3
        d += 4
    while d < H:
        k0 = kt[d]
        a0, a1, a2, a3 = q[0, d], q[1, d], q[2, d], q[3, d]
        for j in range(s):
            w = k0[j]
            o0[j], o1[j], o2[j], o3[j] = o0[j] + a0 * w, o1[j] + a1 * w, o2[j] + a2 * w, o3[j] + a3 * w
        d += 1


@numba.njit(nogil=True, cache=True)
def scores1(q: Any, kt: Any, o: Any) -> None:  # pragma: no cover - compiled
    """``o[j] = sum_d q[d] kt[d, j]``: one row of ``scores4``, element for element the same arithmetic."""
    H, s = kt.shape
    a = q[0]
    for j in range(s):
        o[j] = zero + a * kt[0, j]
    d = 1
    while d + 4 <= H:
        k0, k1, k2, k3 = kt[d], kt[d + 1], kt[d + 2], kt[d + 3]
        a, b, c, e = q[d], q[d + 1], q[d + 2], q[d + 3]
        for j in range(s):
            o[j] = o[j] + a * k0[j] + b * k1[j] + c * k2[j] + e * k3[j]
        d += 4
    while d < H:
        a, k0 = q[d], kt[d]
        for j in range(s):
            o[j] = o[j] + a * k0[j]
        d += 1


@numba.njit(nogil=True, cache=True)
def scores_rows(q: Any, kt: Any, rows: Any, n: Any) -> None:  # pragma: no cover - compiled
    """``rows[r, j] = sum_d q[r, d] kt[d, j]`` for ``r < n``, ``d`` in order from 0, each product and sum
    rounded: four rows at a time share every key loaded, four steps of ``d`` are added per store. Also ``p v``
    (``q`` the probabilities, ``kt`` the values) and ``matmul_fixed``."""
    if n == 4:
        scores4(q, kt, rows)
    else:
        for r in range(n):
            scores1(q[r], kt, rows[r])


@numba.njit(nogil=True, cache=True)
def attend_chunk(q: Any, kt: Any, v: Any, m: Any, l: Any, acc: Any, allowed: Any, masked: Any, kv_heads: Any,
                 groups: Any, rows: Any, out: Any) -> None:  # pragma: no cover - compiled
    """One key chunk of attention for every (batch row, kv head) pair ``p`` and query row ``i``, in place:
    ``q [P, R, H]`` (scaled, R = t * G rows), ``kt [P, H, s]``, ``v [P, s, V]``, ``m``, ``l [P, R]``,
    ``acc [P, R, V]``; ``allowed [b|1, K|1, t|1, G|1, s]`` (``masked``: read it; ``kv_heads`` K and ``groups``
    G place ``p`` and ``i`` in it); ``rows [4, w]`` and ``out [4, V]`` scratch, ``w >= s`` the chunk grid's width:
    a row's scores past ``s`` are -inf, so that its max and sum run over ``w`` entries however short the chunk
    (the last one of a call) is. The same arithmetic as ``matmul_fixed``, then ``softmax_chunk`` over the ``w``
    entries, then ``acc += matmul_fixed(p, v)``."""
    P, R, H = q.shape
    s = kt.shape[2]
    for p in range(P):
        b, kh = p // kv_heads, p % kv_heads
        ab, ak = min(b, allowed.shape[0] - 1), min(kh, allowed.shape[1] - 1)
        for r0 in range(0, R, 4):
            n = min(4, R - r0)
            scores_rows(q[p, r0:], kt[p], rows, n)
            for r in range(n):
                i = r0 + r
                row = rows[r]
                if masked:
                    t, g = min(i // groups, allowed.shape[2] - 1), min(i % groups, allowed.shape[3] - 1)
                    seen = allowed[ab, ak, t, g]
                    for j in range(s):
                        if not seen[j]:
                            row[j] = neg_inf
                for j in range(s, row.shape[0]):
                    row[j] = neg_inf
                m_new = row_max(row, m[p, i])
                shift = zero if m_new == neg_inf else m_new
                alpha = f32(math.exp(m[p, i] - shift))
                exp_row(row, shift)
                l[p, i] = l[p, i] * alpha + row_sum(row)
                m[p, i] = m_new
                for c in range(acc.shape[2]):
                    acc[p, i, c] *= alpha
            scores_rows(rows, v[p], out, n)  # p v: the same product, the keys as its inner index
            for r in range(n):
                for c in range(acc.shape[2]):
                    acc[p, r0 + r, c] += out[r, c]
