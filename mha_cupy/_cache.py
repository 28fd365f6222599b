"""The layer's key/value cache: arrays along the sequence axis with spare capacity.

Letters: B batch, S cached length, K kv heads (or 1 for a first-head cache),
H d_k, V d_v. Writes go through array-api-extra's ``at``: in place where the
library allows it, a functional update where arrays are immutable (JAX).
"""

from __future__ import annotations

from typing import Any

import array_api_extra as xpx

from ._backends import device_of

__all__ = ["KVCache"]


class KVCache:
    """Keys/values with spare capacity, so appends cost amortised O(new).

    The ``kv`` layout holds one array ``[B, cap, 2, K|1, H]``; the ``k``/``v``
    layout holds ``[B, cap, K|1, H]`` and ``[B, cap, K|1, V]``. The first
    ``length`` rows are valid.
    """

    def __init__(self, arrays: tuple[Any, ...], length: int) -> None:
        self.arrays = arrays
        self.length = length

    @classmethod
    def allocate(cls, shapes: list[tuple[int, ...]], length: int, *, xp: Any, dtype: Any, device: Any) -> "KVCache":
        """An uninitialised cache of ``shapes`` (one, or two for the k/v layout) holding ``length`` rows."""
        return cls(tuple(xp.empty(s, dtype=dtype, device=device) for s in shapes), length)

    @property
    def is_kv(self) -> bool:
        return len(self.arrays) == 1

    @property
    def batch(self) -> int:
        return self.arrays[0].shape[0]

    def layout(self) -> list[tuple[int, ...]]:
        """Each array's shape without its sequence axis (what an append must match)."""
        return [(a.shape[0], *a.shape[2:]) for a in self.arrays]

    def views(self) -> tuple[Any, ...]:
        return tuple(a[:, : self.length, ...] for a in self.arrays)

    def keys_values(self, b0: int, b1: int) -> tuple[Any, Any]:
        """Views of the valid keys ``[b, S, K|1, H]`` and values ``[b, S, K|1, V]`` of batch rows ``b0:b1``."""
        views = self.views()
        if self.is_kv:
            return views[0][b0:b1, :, 0, ...], views[0][b0:b1, :, 1, ...]
        return views[0][b0:b1, ...], views[1][b0:b1, ...]

    def write(self, batch: slice, rows: slice, k: Any, v: Any) -> None:
        """Store ``k``/``v`` (their first cached-heads heads) at ``[batch, rows]``."""
        kh = self.arrays[0].shape[-2]
        if self.is_kv:
            kv = xpx.at(self.arrays[0], (batch, rows, 0, Ellipsis)).set(k[:, :, :kh, ...])
            self.arrays = (xpx.at(kv, (batch, rows, 1, Ellipsis)).set(v[:, :, :kh, ...]),)
        else:
            self.arrays = (xpx.at(self.arrays[0], (batch, rows, Ellipsis)).set(k[:, :, :kh, ...]),
                           xpx.at(self.arrays[1], (batch, rows, Ellipsis)).set(v[:, :, :kh, ...]))

    def reserve(self, extra: int, *, xp: Any) -> None:
        """Make room for ``extra`` more rows, doubling the capacity when full."""
        need = self.length + extra
        cap = self.arrays[0].shape[1]
        if need <= cap:
            return
        new_cap = max(need, 2 * cap)
        valid = (slice(None), slice(0, self.length), Ellipsis)
        grown = []
        for a in self.arrays:
            b = xp.empty((a.shape[0], new_cap, *a.shape[2:]), dtype=a.dtype, device=device_of(a))
            grown.append(xpx.at(b, valid).set(a[valid]))
        self.arrays = tuple(grown)

    def moved(self, convert: Any) -> "KVCache":
        """A copy whose valid rows went through ``convert`` (e.g. to another library)."""
        return KVCache(tuple(convert(a) for a in self.views()), self.length)
