"""What each block of one attention problem may see, shared by the forward loop (``_core``) and the backward
(``_backward``): a (batch, query) block's rows in the GEMM layout (``fold``/``unfold``), the keys its queries may
see (``key_span``, ``allowed``: mask, causal, window, row lengths), dropout's keep decisions (``keep``) and its key
and value chunks (``key_chunk``: dequantized, hidden keys zeroed).

Letters as in ``mha_cupy.attention``. Grouped heads are
folded into GEMM rows: the G query heads that share a key/value head become G * T rows of one matrix product
against that head's keys, so keys and values are never repeated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

from . import dropout as _dropout
from ._backends import Backend, device_of
from ._plan import AttentionPlan, ceil_div

__all__ = ["Blocks", "Scalars", "block_of"]


def _slice_or_all(size: int, start: int, stop: int) -> slice:
    return slice(None) if size == 1 else slice(start, stop)


def block_of(x: Any, b: slice, t: slice, s: slice, groups: tuple[int, int], *, xp: Any) -> Any:
    """The ``[b', K', t', G', s']`` block of a 4-D mask/bias ``[B|1, T|1, N|1, S|1]`` for the folded layout."""
    mb, mt, mn, ms = x.shape
    blk = x[
        _slice_or_all(mb, b.start, b.stop), _slice_or_all(mt, t.start, t.stop), :, _slice_or_all(ms, s.start, s.stop)
    ]
    kh, g = groups if mn != 1 else (1, 1)
    blk = xp.reshape(blk, (blk.shape[0], blk.shape[1], kh, g, blk.shape[3]))
    return xp.permute_dims(blk, (0, 2, 1, 3, 4))


class Scalars(NamedTuple):
    """The 0-d arrays the loops compare and fill with, in the compute dtype on the arrays' device."""

    neg_inf: Any
    zero: Any
    one: Any


class Blocks:
    """The blocks of one problem: ``q [B, T, N, H]`` (T real queries; q may hold padded rows past them) over
    ``k [B, S, K, H]``, ``v [B, S, K, V]`` (quantized with ``scales``), ``mask``/``bias`` 4-D or None; ``offsets``
    are the arrays' first (batch, query, key) indices in the whole problem (dropout counters, row lengths and the
    causal and window alignment are the whole problem's, ``plan.extent``)."""

    def __init__(self, q: Any, k: Any, v: Any, *, be: Backend, plan: AttentionPlan, mask: Any = None,
                 bias: Any = None, offsets: tuple[int, int, int] = (0, 0, 0), q_len: int | None = None,
                 scales: tuple[Any, Any] = (None, None)) -> None:
        self.q_len = q.shape[1] if q_len is None else q_len
        if plan.extent is None:
            plan = dataclasses.replace(plan, extent=(self.q_len, k.shape[1]))
        self.q, self.k, self.v, self.be, self.xp, self.plan = q, k, v, be, be.xp, plan
        self.mask, self.bias, self.offsets, self.scales = mask, bias, offsets, scales
        self.N, self.H, self.S, self.K, self.V = q.shape[2], q.shape[3], k.shape[1], k.shape[2], v.shape[3]
        self.G = self.N // self.K
        self.delta = offsets[1] - offsets[2]  # this block's query index minus key index, in the whole problem
        self.limited = plan.limited
        # How far right of its position a query sees (causal: 0, window: its right), None: unbounded.
        rights = ([0] if plan.is_causal else []) + ([plan.window[1]] if plan.window is not None else [])
        self.right = min(rights) if rights else None
        self.dev = device_of(q)
        cdt = self.cdt = be.compute_dtype(q.dtype)
        self.scalars = Scalars(*(self.xp.asarray(c, dtype=cdt, device=self.dev) for c in (-math.inf, 0.0, 1.0)))
        self.index_dtype = self.xp.__array_namespace_info__().default_dtypes(device=self.dev)["indexing"]
        self.keep_scale = 1.0 / (1.0 - plan.dropout_p) if plan.dropout_p < 1.0 else 0.0
        if plan.dropout_key is not None:
            self.keep_decision = be.compile(_dropout.keep_decision, static_argnames=("key", "threshold"))
            self.threshold = _dropout.keep_threshold(plan.dropout_p)
            self.lanes = be.philox_lanes()
            self.heads_idx = self.xp.reshape(self.xp.arange(self.N, dtype=self.lanes, device=self.dev),
                                             (1, self.K, 1, self.G, 1))

    def _index(self, start: int, stop: int, axis: int, dtype: Any) -> Any:
        """``arange(start, stop)`` along ``axis`` of a 5-D ``[b, K, t, G, s]`` layout."""
        shape = [1] * 5
        shape[axis] = stop - start
        return self.xp.reshape(self.xp.arange(start, stop, dtype=dtype, device=self.dev), tuple(shape))

    def rows(self, b0: int, b1: int) -> list[tuple[int, int, int]]:
        """Per local batch row ``b0 <= b < b1``: its queries and keys in local indices (past them nothing exists)
        and its shift (query t sits at key ``t + shift``)."""
        (bo, to, so), plan = self.offsets, self.plan
        found = []
        for b in range(b0 + bo, b1 + bo):
            q_len, kv_len = plan.row_lengths(b)
            found.append((q_len - to, kv_len - so, kv_len - q_len + self.delta))  # the row's alignment, localised
        return found

    def _per_row(self, values: list[int], dtype: Any) -> Any:
        """``values`` (one per batch row) as ``[b, 1, 1, 1, 1]``, or a Python int when they are all equal."""
        if len(set(values)) == 1:
            return values[0]
        return self.xp.reshape(self.xp.asarray(values, dtype=dtype, device=self.dev), (len(values), 1, 1, 1, 1))

    def allowed(self, bsl: slice, tsl: slice, ssl: slice) -> Any:
        """Where queries ``tsl`` may attend keys ``ssl`` (mask, causal, window, row lengths), or None when all may."""
        xp, allowed = self.xp, None
        if self.mask is not None:
            allowed = block_of(self.mask, bsl, tsl, ssl, (self.K, self.G), xp=xp)
        if not self.limited:
            return allowed
        for c in self._limits(bsl, tsl, ssl):
            allowed = c if allowed is None else xp.logical_and(allowed, c)
        return allowed

    def _limits(self, bsl: slice, tsl: slice, ssl: slice) -> list[Any]:
        """The conditions of row lengths, causal and window that hide some key of the tile from some query."""
        idx, window, right = self.index_dtype, self.plan.window, self.right
        q_ends, kv_ends, shifts = (list(c) for c in zip(*self.rows(bsl.start, bsl.stop)))
        s = self._index(ssl.start, ssl.stop, 4, idx)
        t = self._index(tsl.start, tsl.stop, 2, idx)
        conditions = []
        if tsl.stop > min(q_ends):  # some query here is past its row's length
            conditions.append(t < self._per_row(q_ends, idx))
        if ssl.stop > min(kv_ends):
            conditions.append(s < self._per_row(kv_ends, idx))
        if window is not None and ssl.start < tsl.stop - 1 + max(shifts) - window[0]:  # left of some window
            conditions.append(s >= t + self._per_row([x - window[0] for x in shifts], idx))
        if right is not None and ssl.stop - 1 > tsl.start + min(shifts) + right:  # right of some query's reach
            conditions.append(s <= t + self._per_row([x + right for x in shifts], idx))
        return conditions

    def keep(self, bsl: slice, tsl: slice, ssl: slice) -> Any:
        """Dropout's keep decisions ``[b, K, t, G, s]`` for this block (global counters: ``offsets``), or None
        without dropout."""
        if self.plan.dropout_key is None:
            return None
        (bo, to, so), lanes = self.offsets, self.lanes
        return self.keep_decision(
            self._index(bsl.start + bo, bsl.stop + bo, 0, lanes), self.heads_idx,
            self._index(tsl.start + to, tsl.stop + to, 2, lanes), self._index(ssl.start + so, ssl.stop + so, 4, lanes),
            key=self.plan.dropout_key, threshold=self.threshold)

    def key_span(self, b0: int, b1: int, t0: int, t1: int) -> tuple[int, int]:
        """Keys ``[lo, hi)`` that some query of block ``[b0:b1, t0:t1]`` may see (row lengths, causal, window); ``lo``
        on the key chunk grid, so that chunk boundaries are those of the whole key axis, and with ``batch_invariant``
        ``hi`` too (or S). ``(0, 0)``: none."""
        if not self.limited:
            return 0, self.S
        window, right, lo, hi = self.plan.window, self.right, self.S, 0
        for q_end, kv_end, shift in self.rows(b0, b1):
            last = min(t1, self.q_len, q_end) - 1  # the row's last real query in the block
            row_hi = min(self.S, kv_end) if right is None else min(self.S, kv_end, last + shift + right + 1)
            row_lo = 0 if window is None else max(0, t0 + shift - window[0])
            if last >= t0 and row_lo < row_hi:
                lo, hi = min(lo, row_lo), max(hi, row_hi)
        kv = self.plan.chunks.kv
        if self.plan.batch_invariant:  # whole chunks: a row's reductions then have one length whatever its block
            hi = min(self.S, ceil_div(hi, kv) * kv)
        return ((lo // kv) * kv, hi) if lo < hi else (0, 0)

    def key_chunks(self, s_lo: int, s_hi: int) -> range:
        """The first key of each chunk of ``[s_lo, s_hi)``."""
        return range(s_lo, s_hi, self.plan.chunks.kv)

    def fold(self, a: Any, b0: int, b1: int, t0: int, t1: int) -> Any:
        """Rows ``[b0:b1, t0:t1]`` of a ``[B, T, N, D]`` (or ``[B, T, N]``: D = 1) array in the GEMM layout
        ``[b, K, t*G, D]``, in the compute dtype: each kv head's G query heads become rows."""
        xp, K, G = self.xp, self.K, self.G
        blk = a[b0:b1, t0:t1, ...]
        d = blk.shape[3] if blk.ndim == 4 else 1
        blk = xp.permute_dims(xp.reshape(blk, (b1 - b0, t1 - t0, K, G, d)), (0, 2, 1, 3, 4))
        # A copy, C-contiguous: the products and fused kernels read it row by row.
        return xp.astype(xp.reshape(blk, (b1 - b0, K, (t1 - t0) * G, d), copy=True), self.cdt, copy=False)

    def unfold(self, a: Any, nt: int) -> Any:
        """``fold``'s inverse for ``a [b, K, t*G, D]``: ``[b, t, N, D]``."""
        xp, (nb, K, _, d), G = self.xp, a.shape, self.G
        return xp.reshape(xp.permute_dims(xp.reshape(a, (nb, K, nt, G, d)), (0, 2, 1, 3, 4)), (nb, nt, K * G, d))

    def key_chunk(self, bsl: slice, tsl: slice, ssl: slice) -> tuple[Any, Any, Any]:
        """Keys ``[b, s, K, H]`` and values ``[b, s, K, V]`` of chunk ``ssl`` for block ``(bsl, tsl)``, those no
        query of the block may see zeroed (``hide_keys``), and ``allowed`` (None when every query sees every key);
        quantized ones dequantized (``dequantize``)."""
        kb, vb = (self.dequantize(a[bsl, ssl, ...], scale, bsl, ssl) for a, scale in zip((self.k, self.v), self.scales))
        allowed = self.allowed(bsl, tsl, ssl)
        if allowed is not None and (self.mask is not None or self.plan.kv_lengths is not None):  # padding may be NaN
            kb, vb = self.hide_keys(kb, allowed), self.hide_keys(vb, allowed)
        return kb, vb, allowed

    def dequantize(self, chunk: Any, scale: Any, bsl: slice, ssl: slice) -> Any:
        """A chunk of quantized keys or values in q's dtype, times its ``scale [B|1, S|1, 1, 1]`` (one per batch row,
        or per batch row and key: the layer's appended caches); TabPFN's order: cast, then multiply. ``chunk``
        itself when ``scale`` is None."""
        if scale is None:
            return chunk
        rows = bsl if scale.shape[0] > 1 else slice(None)
        keys = ssl if scale.shape[1] > 1 else slice(None)
        return self.xp.astype(chunk, self.q.dtype) * scale[rows, keys, ...]

    def hide_keys(self, chunk: Any, allowed: Any) -> Any:
        """A ``[b, s, K, D]`` chunk of keys or values with 0 for the keys that ``allowed [b|1, K|1, t|1, G|1, s]``
        hides from every query of the block: a zero weight times a NaN or inf would otherwise poison every row."""
        xp = self.xp
        seen = xp.permute_dims(xp.any(allowed, axis=(2, 3)), (0, 2, 1))  # [b|1, s, K|1]
        return xp.where(xp.reshape(seen, (*seen.shape, 1)), chunk, self.scalars.zero)
