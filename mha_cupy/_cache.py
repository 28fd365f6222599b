"""The layer's key/value cache: arrays along the sequence axis with spare capacity.

Letters as in ``mha_cupy.attention`` (S: the cached length; K may be 1, for a first-head cache). Writes go through
array-api-extra's ``at``: in place where the library allows it, a functional update where arrays are immutable
(JAX). The cache's policy lives here too: precomputed keys/values, a call's replace or append, lazy caches.
"""

from __future__ import annotations

import math
from typing import Any

import array_api_extra as xpx

from ._backends import QUANTIZED_MAX, Backend, device_of
from ._validation import check_shape_and_dtype

__all__ = ["KVCache", "QUANTIZED_MAX", "attended", "precomputed_cache", "prepared", "quantize", "store_lazy"]



def quantize(a: Any, name: str, *, be: Backend) -> tuple[Any, Any]:
    """``a [b, s, ...]`` stored as ``name`` with one symmetric scale per batch row: ``(stored, scale [b, 1, 1, 1])``,
    ``a ~= stored * scale``, ``scale = max |a[b]| / QUANTIZED_MAX[name]`` (at least the dtype's smallest normal).
    int8 rounds to the nearest integer; float8 rounds by the cast, clamped first (e4m3fn has no infinity)."""
    xp, top = be.xp, QUANTIZED_MAX[name]
    shape = (a.shape[0], *([1] * (a.ndim - 1)))
    if a.shape[0] == 0 or math.prod(a.shape[1:]) == 0:
        scale = xp.ones(shape, dtype=a.dtype, device=device_of(a))
    else:
        scale = xp.reshape(xp.max(xp.reshape(xp.abs(a), (a.shape[0], -1)), axis=1), shape) / top
        scale = xp.maximum(scale, xp.asarray(xp.finfo(a.dtype).smallest_normal, dtype=a.dtype, device=device_of(a)))
    scaled = a / scale
    if name == "int8":
        scaled = xp.round(scaled)
    return xp.astype(xp.clip(scaled, -top, top), be.quantized_dtypes()[name]), scale


class KVCache:
    """Keys/values with spare capacity, so appends cost amortised O(new).

    The ``kv`` layout holds one array ``[B, cap, 2, K|1, H]``; the ``k``/``v``
    layout holds ``[B, cap, K|1, H]`` and ``[B, cap, K|1, V]``. The first
    ``length`` rows are valid. A quantized cache (``quantized``: a name of
    ``QUANTIZED_MAX``) stores those arrays in that dtype, and ``scales``: one
    ``[B, cap, 1, 1]`` array for keys and one for values (in the layer's
    dtype), each write's rows with the scale of their batch row in that write,
    so that appends never requantize what is stored.
    """

    def __init__(self, arrays: tuple[Any, ...], length: int, scales: tuple[Any, Any] | None = None,
                 quantized: str | None = None) -> None:
        self.arrays = arrays
        self.length = length
        self.scales = scales
        self.quantized = quantized

    @classmethod
    def allocate(cls, shapes: list[tuple[int, ...]], length: int, *, be: Backend, dtype: Any, device: Any,
                 quantized: str | None = None) -> KVCache:
        """An uninitialised cache of ``shapes`` (one, or two for the k/v layout) holding ``length`` rows, stored in
        ``dtype`` or quantized."""
        xp = be.xp
        if quantized is None:
            return cls(tuple(xp.empty(s, dtype=dtype, device=device) for s in shapes), length)
        stored = be.quantized_dtypes()[quantized]
        scales = tuple(xp.empty((*shapes[0][:2], 1, 1), dtype=dtype, device=device) for _ in range(2))
        return cls(tuple(xp.empty(s, dtype=stored, device=device) for s in shapes), length, scales, quantized)

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

    def scales_of(self, b0: int, b1: int) -> tuple[Any, Any]:
        """The valid scales ``[b, S, 1, 1]`` of keys and values of batch rows ``b0:b1``; (None, None) unquantized."""
        if self.scales is None:
            return None, None
        return tuple(s[b0:b1, : self.length, ...] for s in self.scales)

    def write(self, batch: slice, rows: slice, k: Any, v: Any, *, be: Backend) -> None:
        """Store ``k``/``v`` (their first cached-heads heads) at ``[batch, rows]`` (quantized, if the cache is)."""
        kh = self.arrays[0].shape[-2]
        k, v = k[:, :, :kh, ...], v[:, :, :kh, ...]
        if self.quantized is not None:
            (k, k_scale), (v, v_scale) = (quantize(a, self.quantized, be=be) for a in (k, v))
            span = (k.shape[0], k.shape[1], 1, 1)
            self.scales = tuple(xpx.at(s, (batch, rows, Ellipsis)).set(be.xp.broadcast_to(new, span))
                                for s, new in zip(self.scales, (k_scale, v_scale)))
        if self.is_kv:
            kv = xpx.at(self.arrays[0], (batch, rows, 0, Ellipsis)).set(k)
            self.arrays = (xpx.at(kv, (batch, rows, 1, Ellipsis)).set(v),)
        else:
            self.arrays = (xpx.at(self.arrays[0], (batch, rows, Ellipsis)).set(k),
                           xpx.at(self.arrays[1], (batch, rows, Ellipsis)).set(v))

    def reserve(self, extra: int, *, xp: Any) -> None:
        """Make room for ``extra`` more rows, doubling the capacity when full."""
        need = self.length + extra
        cap = self.arrays[0].shape[1]
        if need <= cap:
            return
        new_cap = max(need, 2 * cap)
        valid = (slice(None), slice(0, self.length), Ellipsis)

        def grow(a: Any) -> Any:
            b = xp.empty((a.shape[0], new_cap, *a.shape[2:]), dtype=a.dtype, device=device_of(a))
            return xpx.at(b, valid).set(a[valid])

        self.arrays = tuple(grow(a) for a in self.arrays)
        if self.scales is not None:
            self.scales = tuple(grow(s) for s in self.scales)

    def moved(self, convert: Any, cast: Any = None) -> KVCache:
        """A copy whose valid rows (and scales) went through ``convert`` (e.g. to another library), then the
        floating ones (not a quantized payload) through ``cast`` (e.g. to another float dtype)."""
        cast = cast or (lambda a: a)
        scales = None if self.scales is None else tuple(cast(convert(s)) for s in self.scales_of(0, self.batch))
        payload = convert if self.quantized else (lambda a: cast(convert(a)))
        return KVCache(tuple(payload(a) for a in self.views()), self.length, scales, self.quantized)


def precomputed_cache(pre_k: Any, pre_v: Any, pre_kv: Any, *, kv_heads: int, d_k: int, d_v: int, dtype: Any,
                      be: Backend) -> KVCache | None:
    """The cache holding a layer's precomputed keys/values (``kv_heads`` heads, or 1 shared head), checked; None
    when there are none."""
    K, H, V = kv_heads, d_k, d_v

    def cached_heads(a: Any, axis: int) -> int:  # kv heads, or 1 for a first-head-only cache; else reported against K
        return a.shape[axis] if a.ndim > axis and a.shape[axis] in (1, K) else K

    if pre_kv is not None:
        if H != V:
            msg = (f"precomputed_kv stacks keys and values of one size and needs d_k == d_v, got d_k {H} and d_v {V}; "
                   "use precomputed_k and precomputed_v")
            raise ValueError(msg)
        check_shape_and_dtype(pre_kv, "precomputed_kv", (None, None, 2, cached_heads(pre_kv, 3), H),
                              legend="[batch, kv_len, 2, kv_heads or 1, d_k]", dtype=dtype, be=be)
        return KVCache((pre_kv,), pre_kv.shape[1])
    if pre_k is None:
        return None
    kh = cached_heads(pre_k, 2)
    check_shape_and_dtype(pre_k, "precomputed_k", (None, None, kh, H), legend="[batch, kv_len, kv_heads or 1, d_k]",
                          dtype=dtype, be=be)
    check_shape_and_dtype(pre_v, "precomputed_v", (*pre_k.shape[:2], kh, V),
                          legend="[batch, kv_len, kv_heads or 1, d_v]", dtype=dtype, be=be)
    return KVCache((pre_k, pre_v), pre_k.shape[1])


def prepared(cache: KVCache | None, mode: str | None, shapes: tuple[tuple[int, ...], ...], new_len: int, *,
             be: Backend, dtype: Any, device: Any, quantized: str | None) -> tuple[KVCache | None, int]:
    """The cache a call of cache ``mode`` (None, ``"replace"``, ``"append"``) writes its ``new_len`` rows into, and
    where they start: grown when appending, newly allocated (``shapes``) when replacing; lazy caches are stored
    whole by ``store_lazy`` instead."""
    if mode is None or be.lazy_blocks:
        return cache, 0
    if mode == "append":
        start = cache.length
        cache.reserve(new_len, xp=be.xp)
        cache.length += new_len
        return cache, start
    return KVCache.allocate(list(shapes), new_len, be=be, dtype=dtype, device=device, quantized=quantized), 0


def store_lazy(cache: KVCache | None, mode: str, shapes: tuple[tuple[int, ...], ...], k: Any, v: Any, *,
               xp: Any) -> tuple[KVCache, Any, Any]:
    """Lazy keys/values cached as they are, chunks included (appends concatenate): the new cache, and the keys and
    values the call attends to."""
    kh = shapes[0][-2]
    k_c, v_c = k[:, :, :kh, ...], v[:, :, :kh, ...]
    new = (xp.stack([k_c, v_c], axis=2),) if len(shapes) == 1 else (k_c, v_c)
    if mode == "append":
        new = tuple(xp.concat([old, a], axis=1) for old, a in zip(cache.views(), new))
    cache = KVCache(new, new[0].shape[1])
    return (cache, *cache.keys_values(0, k.shape[0])) if mode == "append" else (cache, k, v)


def attended(cache: KVCache | None, mode: str | None, source: str, shapes: tuple[tuple[int, ...], ...], k: Any,
             v: Any, rows: tuple[int, int], offset: int, *, be: Backend) -> tuple[KVCache | None, Any, Any, Any]:
    """What batch rows ``rows = (b0, b1)`` of a call attend to, after the cache took this call's keys ``k`` and values
    ``v`` (cache ``mode``: None, ``"replace"``, ``"append"``; written at ``offset``): the cache, keys, values and
    the quantization scales of keys and values (``(None, None)``: not quantized). ``source`` is the call's
    (``"self"``, ``"cross"``, ``"cache"``)."""
    if mode is not None and be.lazy_blocks:
        return (*store_lazy(cache, mode, shapes, k, v, xp=be.xp), (None, None))
    b0, b1 = rows
    if mode is not None:
        assert cache is not None  # noqa: S101 - prepared() made it
        cache.write(slice(b0, b1), slice(offset, offset + k.shape[1]), k, v, be=be)
        if mode == "append":
            return (cache, *cache.keys_values(b0, b1), cache.scales_of(b0, b1))
        return cache, k, v, (None, None)
    if source == "cache":
        assert cache is not None  # noqa: S101 - the call was checked against an empty cache
        return cache, k, v, cache.scales_of(b0, b1)
    return cache, k, v, (None, None)
