"""Counter-based random numbers: Philox4x32-10 evaluated in any Array API namespace, the seeds and streams
under one layer seed, and uniform numbers (weight initialisation); dropout's keep decisions are in ``dropout``.

Every random word is a pure function of a 64-bit key and a 128-bit counter, so
the numbers do not depend on how work is chunked, in which order blocks run,
or which array library computes them.

The arithmetic is unsigned 32-bit, carried in the integer lanes the library
adapter names (``Backend.philox_lanes``), each exact and bitwise the same:

- ``uint64`` (NumPy, CuPy, array_api_strict, JAX with ``jax_enable_x64``): one
  exact 64-bit product per multiply;
- ``int64`` (PyTorch, which has no shifts or additions on ``uint32``): products
  split into 16-bit halves so no intermediate exceeds 2**49;
- ``uint32`` (JAX without ``jax_enable_x64``): four 16 x 16-bit partial
  products, no intermediate above 2**32 - 1, so nothing relies on wrapping.

"""

from __future__ import annotations

import math
import secrets
from typing import Any

import array_api_compat

from ._backends import resolve_backend

__all__ = ["MASK32", "STREAMS", "philox4x32", "philox4x32_scalar", "split_seed", "derive_seed", "random_seed",
           "uniform"]

#: Philox stream of each weight (and of dropout) under one layer seed.
STREAMS = {"w_qkv": 1, "w_q": 2, "w_kv": 3, "w_k": 4, "w_v": 5, "w_out": 6, "dropout": 7}

MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
ROUNDS = 10


def _mulhilo_wide(a: Any, m: int) -> tuple[Any, Any]:
    """High and low words of ``a * m`` where the lanes hold the whole 64-bit product (uint64, Python ints)."""
    p = a * m
    return p >> 32, p & MASK32


def _mulhilo_int64(a: Any, m: int) -> tuple[Any, Any]:
    """The same in int64 lanes: ``m`` split into 16-bit halves, every intermediate below 2**49."""
    m_hi, m_lo = m >> 16, m & 0xFFFF
    p_lo = a * m_lo
    p_hi = a * m_hi
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & MASK32
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi, lo


def _mulhilo_uint32(a: Any, m: int) -> tuple[Any, Any]:
    """The same in uint32 lanes: four 16 x 16-bit partial products, nothing above 2**32 - 1."""
    m_hi, m_lo = m >> 16, m & 0xFFFF
    a_hi, a_lo = a >> 16, a & 0xFFFF
    ll, lh, hl, hh = a_lo * m_lo, a_lo * m_hi, a_hi * m_lo, a_hi * m_hi
    mid = (ll >> 16) + (lh & 0xFFFF) + (hl & 0xFFFF)  # < 3 * 2**16
    hi = hh + (lh >> 16) + (hl >> 16) + (mid >> 16)
    lo = ((mid & 0xFFFF) << 16) | (ll & 0xFFFF)
    return hi, lo


def _mulhilo_for(dtype: Any, xp: Any) -> Any:
    for lanes, mulhilo in (("uint64", _mulhilo_wide), ("int64", _mulhilo_int64), ("uint32", _mulhilo_uint32)):
        if dtype == getattr(xp, lanes):
            return mulhilo
    msg = f"Philox counters must be uint64, int64 or uint32 arrays, got {dtype}"
    raise TypeError(msg)


def _round_keys(key: tuple[int, int]) -> list[tuple[int, int]]:
    k0, k1 = key
    keys = [(k0, k1)]
    for _ in range(ROUNDS - 1):
        k0, k1 = (k0 + _W0) & MASK32, (k1 + _W1) & MASK32
        keys.append((k0, k1))
    return keys


def philox4x32(counter: tuple[Any, Any, Any, Any], key: tuple[int, int]) -> tuple[Any, Any, Any, Any]:
    """Philox4x32-10 on arrays (or on Python ints).

    ``counter`` is four arrays of one integer dtype (uint64, int64 or uint32)
    holding 32-bit values, broadcasting together, or four Python ints; ``key``
    is two Python ints below ``2**32``. Returns the four output words in the
    counter's dtype.
    """
    arrays = [c for c in counter if not isinstance(c, int)]
    if arrays:
        xp = array_api_compat.array_namespace(*arrays)
        dtype, dev = arrays[0].dtype, array_api_compat.device(arrays[0])
        mulhilo = _mulhilo_for(dtype, xp)

        def word(v: int) -> Any:  # keys as arrays: JAX refuses Python ints above 2**31 beside uint32
            return xp.asarray(v, dtype=dtype, device=dev)
    else:
        mulhilo = _mulhilo_wide

        def word(v: int) -> Any:
            return v
    c0, c1, c2, c3 = counter
    for k0, k1 in _round_keys(key):
        hi0, lo0 = mulhilo(c0, _M0)
        hi1, lo1 = mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ word(k0), lo1, hi0 ^ c3 ^ word(k1), lo0
    return c0, c1, c2, c3


def philox4x32_scalar(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """Philox4x32-10 on Python ints (for deriving keys on the host)."""
    return tuple(int(w) for w in philox4x32(counter, key))  # type: ignore[return-value]


def random_seed() -> int:
    """A fresh 63-bit seed from the operating system."""
    return secrets.randbits(63)


def split_seed(seed: int) -> tuple[int, int]:
    """The Philox key ``(low word, high word)`` of a seed in ``[0, 2**64)`` (checked by the caller:
    ``_validation.check_seed``)."""
    return seed & MASK32, seed >> 32


def derive_seed(seed: int, stream: int, index: int) -> int:
    """A 64-bit seed for sub-stream ``(stream, index)`` of ``seed`` (e.g. one forward call)."""
    w = philox4x32_scalar((index & MASK32, index >> 32 & MASK32, stream & MASK32, 0x6D6861), split_seed(seed))
    return w[0] | w[1] << 32


def uniform(seed: int, stream: int, shape: tuple[int, ...], dtype: Any, *, xp: Any, device: Any) -> Any:
    """Uniform numbers in ``[0, 1)`` of ``shape``: counter ``(n mod 2**32, n // 2**32, stream, 0)`` for flat index
    ``n``.

    float64 takes 53 bits from two words, other dtypes 24 bits from one
    (exact in float32, then rounded once to ``dtype``), so the numbers are
    the same on every library.
    """
    lanes = resolve_backend(xp).philox_lanes()
    size = math.prod(shape)
    if size > MASK32 and lanes == xp.uint32:
        msg = f"uniform draws at most 2**32 numbers in uint32 lanes, got shape {shape}"
        raise ValueError(msg)
    n = xp.arange(size, dtype=lanes, device=device)
    zero = xp.zeros((), dtype=lanes, device=device)
    low, high = (n, zero) if lanes == xp.uint32 else (n & MASK32, n >> 32)
    w0, w1, _, _ = philox4x32((low, high, zero + stream, zero), split_seed(seed))
    if dtype == xp.float64:
        u = (xp.astype(w0 >> 5, xp.float64) * 2.0**26 + xp.astype(w1 >> 6, xp.float64)) * 2.0**-53
    else:
        u = xp.astype(xp.astype(w0 >> 8, xp.float32) * 2.0**-24, dtype)
    return xp.reshape(u, shape)
