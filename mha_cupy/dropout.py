"""Counter-based random numbers: Philox4x32-10 evaluated in any Array API namespace.

Every random word is a pure function of a 64-bit key and a 128-bit counter, so
the numbers do not depend on how work is chunked, in which order blocks run,
or which array library computes them.

The arithmetic is unsigned 32-bit, carried in ``int64`` lanes and masked to
32 bits after every step. (PyTorch has ``uint32`` tensors but no shifts or
additions on them; ``int64`` arithmetic is exact on every library.)
32 x 32-bit products are split into 16-bit halves so no intermediate exceeds
2**49.

Dropout of attention weight (batch ``b``, head ``h``, query ``i``, key ``j``)
draws counter ``(j, i, h, b)`` under key ``seed`` and keeps the weight when
the first output word is at least ``round(p * 2**32)``.
"""

from __future__ import annotations

import secrets
from typing import Any

__all__ = [
    "philox4x32",
    "philox4x32_scalar",
    "keep_threshold",
    "keep_mask",
    "split_seed",
    "derive_seed",
    "random_seed",
    "uniform",
]

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
ROUNDS = 10


def _mulhilo(a: Any, m: int) -> tuple[Any, Any]:
    """High and low 32-bit words of ``a * m`` for 32-bit ``a`` (int64 lanes) and constant ``m``."""
    m_hi, m_lo = m >> 16, m & 0xFFFF
    p_lo = a * m_lo  # < 2**48
    p_hi = a * m_hi  # < 2**48
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi, lo


def philox4x32(counter: tuple[Any, Any, Any, Any], key: tuple[int, int]) -> tuple[Any, Any, Any, Any]:
    """Philox4x32-10 on arrays.

    ``counter`` is four ``int64`` arrays (or Python ints) of 32-bit values that
    broadcast together; ``key`` is two Python ints below ``2**32``. Returns
    the four output words as ``int64`` arrays holding 32-bit values. Works on
    Python ints too (see ``philox4x32_scalar``).
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(ROUNDS):
        if r:
            k0 = (k0 + _W0) & _MASK32
            k1 = (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox4x32_scalar(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """Philox4x32-10 on Python ints (for deriving keys on the host)."""
    return tuple(int(w) for w in philox4x32(counter, key))  # type: ignore[return-value]


def random_seed() -> int:
    """A fresh 63-bit seed from the operating system."""
    return secrets.randbits(63)


def split_seed(seed: int) -> tuple[int, int]:
    """The Philox key ``(low word, high word)`` of a seed in ``[0, 2**64)``."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        msg = f"seed must be an int in [0, 2**64), got {type(seed).__name__} {seed!r}"
        raise TypeError(msg)
    if not 0 <= seed < 2**64:
        msg = f"seed must be an int in [0, 2**64), got {seed}"
        raise ValueError(msg)
    return seed & _MASK32, seed >> 32


def derive_seed(seed: int, stream: int, index: int) -> int:
    """A 64-bit seed for sub-stream ``(stream, index)`` of ``seed`` (e.g. one forward call)."""
    w = philox4x32_scalar((index & _MASK32, index >> 32 & _MASK32, stream & _MASK32, 0x6D6861), split_seed(seed))
    return w[0] | w[1] << 32


def keep_threshold(p: float) -> int:
    """The 32-bit threshold below which a weight is dropped with probability ``p``."""
    return min(round(p * 2**32), 2**32)


def keep_mask(seed: int, p: float, b: Any, h: Any, i: Any, j: Any) -> Any:
    """Boolean keep mask for dropout with probability ``p``.

    ``b, h, i, j`` are ``int64`` index arrays (batch, head, query, key) that
    broadcast to the mask's shape; the result is True where the weight is kept.
    """
    w0, _, _, _ = philox4x32((j, i, h, b), split_seed(seed))
    return w0 >= keep_threshold(p)


def uniform(seed: int, stream: int, shape: tuple[int, ...], dtype: Any, *, xp: Any, device: Any) -> Any:
    """Uniform numbers in ``[0, 1)`` of ``shape``: counter ``(n mod 2**32, n // 2**32, stream, 0)`` for flat index ``n``.

    float64 takes 53 bits from two words, other dtypes 24 bits from one, so
    the numbers are the same on every library.
    """
    size = 1
    for s in shape:
        size *= s
    n = xp.arange(size, dtype=xp.int64, device=device)
    zero = xp.zeros((), dtype=xp.int64, device=device)
    w0, w1, _, _ = philox4x32((n & _MASK32, n >> 32, zero + stream, zero), split_seed(seed))
    if dtype == xp.float64:
        u = (xp.astype(w0 >> 5, xp.float64) * 2.0**26 + xp.astype(w1 >> 6, xp.float64)) * 2.0**-53
    else:
        u = xp.astype(xp.astype(w0 >> 8, xp.float64) * 2.0**-24, dtype)
    return xp.reshape(u, shape)
