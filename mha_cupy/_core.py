"""The chunked attention loop with an online softmax, on validated arrays and a resolved plan.

Letters: B batch, T query length, S key length, N query heads, K key/value
heads, G = N // K query heads per key/value head, H key size (d_k), V value
size (d_v).

The loop visits blocks of (batch rows, query rows); inside each it walks the
keys in chunks, keeping a running maximum, a running sum and a rescaled
accumulator (Rabe & Staats, arXiv 2112.05682), so no score matrix larger than
one tile ever exists. Grouped heads are folded into GEMM rows: the G query
heads that share a key/value head become G * T rows of one matrix product
against that head's keys, so keys and values are never repeated.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from . import dropout as _dropout
from ._backends import Backend, device_of
from ._budget import ChunkPlan, plan_chunks, resolve_memory_budget
from ._merge import merge_partials
from ._random import split_seed
from ._threads import run_blocks
from ._validation import check_optional_positive_int, check_positive_int

__all__ = ["AttentionPlan", "ChunkLoop", "Scalars", "block_of", "plan_attention", "attend", "INVARIANT_CHUNKS"]

#: The tiles of ``batch_invariant`` calls: 32 queries (padded) by 512 keys. The products are fixed-order
#: ones (``Backend.matmul``), row by row; the fixed key chunks give every row's reductions one length, and
#: whole query tiles keep every element-wise pass free of a differently computed remainder.
INVARIANT_CHUNKS = ChunkPlan(batch=1, q=32, kv=512)


@dataclass(frozen=True)
class AttentionPlan:
    """One attention call, resolved: everything ``attend`` needs besides the arrays and their backend."""

    scale: float
    chunks: ChunkPlan
    workers: int
    is_causal: bool = False
    dropout_p: float = 0.0
    #: Philox key ``(low, high)`` of the dropout seed; None without dropout.
    dropout_key: tuple[int, int] | None = None
    #: Key ranges per block computed on separate workers and merged by log-sum-exp (few blocks, many keys).
    key_splits: int = 1
    #: Also return the log-sum-exp ``[B, T, N]`` of each query row's logits.
    with_lse: bool = False
    #: Fixed tiles (queries padded to whole tiles, no key splits): every row's result is bitwise the
    #: same whatever else is in the call.
    batch_invariant: bool = False
    #: Query and key lengths ``(T, S)`` of the whole problem: the default row lengths and the alignment
    #: (None: those of the arrays ``attend`` is given).
    extent: tuple[int, int] | None = None
    #: Per batch row (whole problem): the queries and keys that exist (None: all T, all S). Queries past a row's
    #: length give 0 (lse ``-inf``); keys past it are hidden, and key chunks wholly past it are skipped.
    q_lengths: tuple[int, ...] | None = None
    kv_lengths: tuple[int, ...] | None = None
    #: Sliding window ``(left, right)``: query t of row b sees keys ``p - left <= s <= p + right``,
    #: ``p = t + kv_len(b) - q_len(b)`` (``row_lengths``: bottom-right, as causal); None: no window. Key chunks outside every query's window are skipped.
    window: tuple[int, int] | None = None
    #: Logit soft-capping: logits (after the scale, before bias and masks) become ``c * tanh(logits / c)``.
    softcap: float | None = None

    def row_lengths(self, b: int) -> tuple[int, int]:
        """``(queries, keys)`` of batch row ``b`` of the whole problem."""
        T, S = self.extent or (0, 0)
        return (T if self.q_lengths is None else self.q_lengths[b]), (S if self.kv_lengths is None else self.kv_lengths[b])

    def key_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        """``key_splits`` ranges of whole key chunks covering ``[start, end)`` (``start`` on the chunk grid; fewer
        ranges when there are fewer chunks)."""
        chunks = -(-(end - start) // self.chunks.kv)
        per = -(-chunks // max(1, min(self.key_splits, chunks))) * self.chunks.kv if chunks > 0 else 1
        return [(s0, min(end, s0 + per)) for s0 in range(start, end, per)] or [(start, start)]

    def blocks(self, batch: int, q_len: int) -> list[tuple[int, int, int, int]]:
        """The (batch rows, query rows) blocks ``(b0, b1, t0, t1)``, batch-major."""
        c = self.chunks
        return [(b0, min(batch, b0 + c.batch), t0, min(q_len, t0 + c.q))
                for b0 in range(0, batch, c.batch) for t0 in range(0, q_len, c.q)]


def plan_attention(
    *,
    be: Backend,
    device: Any,
    shape: tuple[int, int, int, int, int, int],
    dtype: Any,
    scale: float,
    masked: bool = False,
    biased: bool = False,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    seed: int | None = None,
    q_chunk_size: Any = None,
    kv_chunk_size: Any = None,
    memory_budget: Any = None,
    workers: Any = None,
    budget_divisor: int = 1,
    return_lse: bool = False,
    batch_invariant: bool = False,
    dequantized_key_bytes: int = 0,
    q_lengths: tuple[int, ...] | None = None,
    kv_lengths: tuple[int, ...] | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
) -> AttentionPlan:
    """Validate the tuning keywords and resolve them into a plan.

    ``shape`` is ``(B, T, S, N, H, V)`` of one block of work (for the layer,
    one ``save_peak_mem_factor`` part); ``budget_divisor`` divides the memory
    budget (the factor bounds the attention's working set too, down to
    cache-sized tiles on CPUs: see ``plan_chunks``). With
    ``batch_invariant`` the tiles are ``INVARIANT_CHUNKS`` whatever the budget
    and chunk sizes say (they are still validated). ``dequantized_key_bytes``: see ``plan_chunks``. The row
    lengths, window and soft cap (validated by the caller) go into the plan as they are.
    """
    B, T, S, N, H, V = shape
    q_chunk = check_optional_positive_int(q_chunk_size, "q_chunk_size")
    kv_chunk = check_optional_positive_int(kv_chunk_size, "kv_chunk_size")
    workers = be.default_workers(device) if workers is None else check_positive_int(workers, "workers")
    budget = resolve_memory_budget(memory_budget, be=be, device=device)
    chunks = plan_chunks(
        batch=B, q_len=T, kv_len=S, heads=N, d_k=H, d_v=V, compute_itemsize=be.itemsize(be.compute_dtype(dtype)),
        dropout=dropout_p > 0, biased=biased or softcap is not None,
        masked=masked or is_causal or window is not None or q_lengths is not None or kv_lengths is not None,
        budget=budget, q_chunk=q_chunk, kv_chunk=kv_chunk,
        workers=workers, on_cpu=be.is_cpu(device), divisor=budget_divisor, dequantized_key_bytes=dequantized_key_bytes,
    )
    if batch_invariant:
        rows = chunks.batch * chunks.q // INVARIANT_CHUNKS.q
        chunks = ChunkPlan(batch=max(1, min(B, rows)), q=INVARIANT_CHUNKS.q, kv=INVARIANT_CHUNKS.kv)
    key = split_seed(seed) if dropout_p > 0 else None
    return AttentionPlan(scale=scale, chunks=chunks, workers=workers, is_causal=is_causal,
                         dropout_p=dropout_p if key is not None else 0.0, dropout_key=key,
                         key_splits=1 if batch_invariant else _key_splits(chunks, B, T, S, workers, be),
                         with_lse=return_lse, batch_invariant=batch_invariant, extent=(T, S), q_lengths=q_lengths,
                         kv_lengths=kv_lengths, window=window, softcap=softcap)


def _key_splits(chunks: ChunkPlan, B: int, T: int, S: int, workers: int, be: Backend) -> int:
    """Split the keys when there are fewer (batch, query) blocks than workers, so that every worker has
    work (TabPFN's test rows over many training rows: a handful of queries, hundreds of thousands of keys)."""
    blocks = -(-max(B, 1) // chunks.batch) * -(-max(T, 1) // chunks.q)
    if workers <= 1 or blocks >= workers or not be.item_assignment:
        return 1
    return max(1, min(workers // blocks, -(-S // chunks.kv)))


def attend(q: Any, k: Any, v: Any, *, be: Backend, plan: AttentionPlan, mask: Any = None, bias: Any = None,
           offsets: tuple[int, int, int] = (0, 0, 0), scales: tuple[Any, Any] = (None, None)) -> Any:
    """Attention of validated ``q [B,T,N,H]`` over ``k [B,S,K,H]``, ``v [B,S,K,V]`` of backend ``be`` under ``plan``.

    ``mask`` and ``bias`` are 4-D (``check_mask``). When the arrays are blocks
    of a larger problem, ``offsets`` are the block's first (batch, query, key)
    indices in it (the dropout counter, the row lengths and the causal and
    window alignment are those of the whole problem, ``plan.extent``). ``scales`` are those of quantized keys and values (``[B|1, 1, 1, 1]`` in
    q's dtype, or None: ``check_quantized``), applied chunk by chunk. Arrays are in memory here; lazy chunked
    ones are decided at the entry points (``_lazy``). Returns the output
    ``[B,T,N,V]``, or ``(output, lse)`` with ``plan.with_lse`` (``lse [B,T,N]``
    in the compute dtype). Blocks write their own slices (or, where arrays are
    immutable, are concatenated), and key ranges split over workers merge
    exactly by log-sum-exp, so the result does not depend on the order or the
    number of workers beyond rounding.
    """
    xp, T = be.xp, q.shape[1]
    if plan.batch_invariant and T % plan.chunks.q:  # whole tiles: padded rows are computed, then dropped
        pad = -T % plan.chunks.q
        q = _pad_queries(q, pad, 0.0, xp=xp)
        mask, bias = (a if a is None or a.shape[1] == 1 else _pad_queries(a, pad, fill, xp=xp)  # kept if broadcast
                      for a, fill in ((mask, False), (bias, 0.0)))  # padded rows see no key: they hide none
    loop = ChunkLoop(q, k, v, be=be, plan=plan, mask=mask, bias=bias, offsets=offsets, q_len=T, scales=scales)
    result = _run(loop)
    if q.shape[1] == T:
        return result
    out = result[0] if plan.with_lse else result
    out = out[:, :T, ...]
    return (out, result[1][:, :T, ...]) if plan.with_lse else out


def _pad_queries(a: Any, pad: int, fill: float | bool, *, xp: Any) -> Any:
    """``a`` with ``pad`` rows of ``fill`` appended along its query axis."""
    tail = xp.full((a.shape[0], pad, *a.shape[2:]), fill, dtype=a.dtype, device=device_of(a))
    return xp.concat([a, tail], axis=1)


def _run(loop: "ChunkLoop") -> Any:
    """Every block of ``loop``'s problem: written in place, or concatenated where arrays are immutable."""
    plan, be, xp, (B, T, N, _) = loop.plan, loop.be, loop.xp, loop.q.shape
    blocks = plan.blocks(B, T)
    if not blocks:  # a zero batch or query length
        out = xp.zeros((B, T, N, loop.V), dtype=loop.q.dtype, device=loop.dev)
        return (out, xp.zeros((B, T, N), dtype=loop.cdt, device=loop.dev)) if plan.with_lse else out
    if not be.item_assignment:
        return _assemble([loop.finish(*loop.whole_block(*blk)) for blk in blocks], plan, B, xp=xp)
    out = xp.empty((B, T, N, loop.V), dtype=loop.q.dtype, device=loop.dev)
    lse = xp.empty((B, T, N), dtype=loop.cdt, device=loop.dev) if plan.with_lse else None

    def write(blk: tuple[int, int, int, int], res: Any, block_lse: Any) -> None:
        out[blk[0]:blk[1], blk[2]:blk[3], ...] = xp.astype(res, out.dtype) if res.dtype != out.dtype else res
        if lse is not None:
            lse[blk[0]:blk[1], blk[2]:blk[3], ...] = block_lse

    if plan.key_splits == 1:
        run_blocks(lambda *blk: write(blk, *loop.finish(*loop.whole_block(*blk))), blocks, plan.workers, be)
    else:
        ranges = [plan.key_ranges(*loop.key_span(*blk)) for blk in blocks]
        parts: list[list[Any]] = [[None] * len(r) for r in ranges]

        def part(i: int, j: int) -> None:  # merged in range order below: the same bits on every run
            parts[i][j] = loop.normalize(*loop.block_state(*blocks[i], *ranges[i][j]), split=True)

        run_blocks(part, [(i, j) for i, r in enumerate(ranges) for j in range(len(r))], plan.workers, be)
        for blk, block_parts in zip(blocks, parts):
            outs, maxima, log_sums = zip(*block_parts)
            write(blk, *merge_partials(outs, log_sums, bases=maxima, xp=xp))
    return out if lse is None else (out, lse)


def _assemble(results: list[tuple[Any, Any]], plan: AttentionPlan, B: int, *, xp: Any) -> Any:
    """Concatenate the blocks' results (batch-major) where arrays are immutable."""
    per_row = len(results) // -(-B // plan.chunks.batch) if results else 0

    def join(parts: list[Any]) -> Any:
        rows = [parts[r:r + per_row] for r in range(0, len(parts), per_row)]
        return xp.concat([xp.concat(r, axis=1) if len(r) > 1 else r[0] for r in rows], axis=0)

    out = join([r for r, _ in results])
    return (out, join([lse for _, lse in results])) if plan.with_lse else out


def _slice_or_all(size: int, start: int, stop: int) -> slice:
    return slice(None) if size == 1 else slice(start, stop)


def block_of(x: Any, b: slice, t: slice, s: slice, groups: tuple[int, int], *, xp: Any) -> Any:
    """The ``[b', K', t', G', s']`` block of a 4-D mask/bias ``[B|1, T|1, N|1, S|1]`` for the folded layout."""
    mb, mt, mn, ms = x.shape
    blk = x[_slice_or_all(mb, b.start, b.stop), _slice_or_all(mt, t.start, t.stop), :, _slice_or_all(ms, s.start, s.stop)]
    kh, g = groups if mn != 1 else (1, 1)
    blk = xp.reshape(blk, (blk.shape[0], blk.shape[1], kh, g, blk.shape[3]))
    return xp.permute_dims(blk, (0, 2, 1, 3, 4))


class Scalars(NamedTuple):
    """The 0-d arrays the loop compares and fills with, in the compute dtype on the arrays' device."""

    neg_inf: Any
    zero: Any
    one: Any


class ChunkLoop:
    """One attention problem as chunk loops: ``block_state`` computes a (batch, query) block's online-softmax state
    ``(m, l, acc)`` over a key range, ``normalize`` turns a state into output rows and their log-sum-exp in the
    compute dtype, ``finish`` into the output dtype. ``fold``/``unfold``, ``key_chunk``, ``allowed``, ``keep``
    and ``key_span`` are what the backward (``_backward``) shares with the forward."""

    def __init__(self, q: Any, k: Any, v: Any, *, be: Backend, plan: AttentionPlan, mask: Any, bias: Any,
                 offsets: tuple[int, int, int], q_len: int | None = None,
                 scales: tuple[Any, Any] = (None, None)) -> None:
        self.q_len = q.shape[1] if q_len is None else q_len  # real queries: q may hold padded rows past them
        if plan.extent is None:
            plan = dataclasses.replace(plan, extent=(self.q_len, k.shape[1]))
        self.q, self.k, self.v, self.be, self.xp, self.plan = q, k, v, be, be.xp, plan
        self.scales = scales  # of quantized keys and values
        self.mask, self.bias, self.offsets = mask, bias, offsets
        self.N, self.H = q.shape[2], q.shape[3]
        self.S, self.K, self.V = k.shape[1], k.shape[2], v.shape[3]
        self.G = self.N // self.K
        self.delta = offsets[1] - offsets[2]  # this block's query index minus key index, in the whole problem
        self.limited = any(x is not None for x in (plan.q_lengths, plan.kv_lengths, plan.window)) or plan.is_causal
        # How far right of its position a query sees (causal: 0, window: its right), None: unbounded.
        rights = ([0] if plan.is_causal else []) + ([plan.window[1]] if plan.window is not None else [])
        self.right = min(rights) if rights else None
        self.dev = device_of(q)
        cdt = self.cdt = be.compute_dtype(q.dtype)
        self.scalars = Scalars(*(self.xp.asarray(c, dtype=cdt, device=self.dev) for c in (-math.inf, 0.0, 1.0)))
        # Library fast paths: on JAX each is compiled once per shape instead of op by op.
        self.step = be.compile(_online_softmax_step, static_argnames=("be", "keep_scale", "fixed_order", "softcap"))
        self.keep_decision = be.compile(_dropout.keep_decision, static_argnames=("key", "threshold"))
        self.keep_scale = 1.0 / (1.0 - plan.dropout_p) if plan.dropout_p < 1.0 else 0.0
        self.threshold = _dropout.keep_threshold(plan.dropout_p)
        self.index_dtype = self.xp.__array_namespace_info__().default_dtypes(device=self.dev)["indexing"]
        if plan.dropout_key is not None:
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
        for c in conditions:
            allowed = c if allowed is None else xp.logical_and(allowed, c)
        return allowed

    def keep(self, bsl: slice, tsl: slice, ssl: slice) -> Any:
        """Dropout's keep decisions ``[b, K, t, G, s]`` for this block (global counters: ``offsets``)."""
        (bo, to, so), lanes = self.offsets, self.lanes
        return self.keep_decision(
            self._index(bsl.start + bo, bsl.stop + bo, 0, lanes), self.heads_idx,
            self._index(tsl.start + to, tsl.stop + to, 2, lanes), self._index(ssl.start + so, ssl.stop + so, 4, lanes),
            key=self.plan.dropout_key, threshold=self.threshold)

    def key_span(self, b0: int, b1: int, t0: int, t1: int) -> tuple[int, int]:
        """Keys ``[lo, hi)`` that some query of block ``[b0:b1, t0:t1]`` may see (row lengths, causal, window); ``lo``
        on the key chunk grid, so that chunk boundaries are those of the whole key axis. ``(0, 0)``: none."""
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
        return ((lo // kv) * kv, hi) if lo < hi else (0, 0)

    def fold(self, a: Any, b0: int, b1: int, t0: int, t1: int) -> Any:
        """Rows ``[b0:b1, t0:t1]`` of a ``[B, T, N, D]`` (or ``[B, T, N]``: D = 1) array in the GEMM layout
        ``[b, K, t*G, D]``, in the compute dtype: each kv head's G query heads become rows."""
        xp, K, G = self.xp, self.K, self.G
        blk = a[b0:b1, t0:t1, ...]
        d = blk.shape[3] if blk.ndim == 4 else 1
        blk = xp.permute_dims(xp.reshape(blk, (b1 - b0, t1 - t0, K, G, d)), (0, 2, 1, 3, 4))
        blk = xp.reshape(blk, (b1 - b0, K, (t1 - t0) * G, d))
        return xp.astype(blk, self.cdt) if blk.dtype != self.cdt else blk

    def unfold(self, a: Any, nt: int) -> Any:
        """``fold``'s inverse for ``a [b, K, t*G, D]``: ``[b, t, N, D]``."""
        xp, (nb, K, _, d), G = self.xp, a.shape, self.G
        return xp.reshape(xp.permute_dims(xp.reshape(a, (nb, K, nt, G, d)), (0, 2, 1, 3, 4)), (nb, nt, K * G, d))

    def whole_block(self, b0: int, b1: int, t0: int, t1: int) -> tuple[Any, Any, Any]:
        """``block_state`` over every key the block's queries may see."""
        return self.block_state(b0, b1, t0, t1, *self.key_span(b0, b1, t0, t1))

    def block_state(self, b0: int, b1: int, t0: int, t1: int, s_lo: int, s_hi: int) -> tuple[Any, Any, Any]:
        """The online-softmax state ``(m, l, acc)`` of block ``[b0:b1, t0:t1]`` over keys ``[s_lo, s_hi)``."""
        xp, K, G, V, cdt = self.xp, self.K, self.G, self.V, self.cdt
        nb, nt = b1 - b0, t1 - t0
        qb = self.fold(self.q, b0, b1, t0, t1) * self.plan.scale
        m = xp.full((nb, K, nt, G, 1), -math.inf, dtype=cdt, device=self.dev)
        l = xp.zeros((nb, K, nt, G, 1), dtype=cdt, device=self.dev)
        acc = xp.zeros((nb, K, nt * G, V), dtype=cdt, device=self.dev)
        # One score tile per block, reused by every key chunk, where matmul writes into it: a fresh tile per
        # chunk costs page faults whenever freed memory goes back to the OS (Dask workers trim at 64 KiB).
        rows = nb * K * nt * G
        chunk = min(self.plan.chunks.kv, s_hi - s_lo)
        tile = xp.empty((rows * chunk,), dtype=cdt, device=self.dev) if self.be.matmul_writes_out else None
        for s0 in range(s_lo, s_hi, self.plan.chunks.kv):
            bsl, tsl, ssl = slice(b0, b1), slice(t0, t1), slice(s0, min(s_hi, s0 + self.plan.chunks.kv))
            ns = ssl.stop - ssl.start
            kb, vb, allowed = self.key_chunk(bsl, tsl, ssl)
            kb, vb = xp.permute_dims(kb, (0, 2, 3, 1)), xp.permute_dims(vb, (0, 2, 1, 3))  # [b, K, H, s], [b, K, s, V]
            bias = None if self.bias is None else block_of(self.bias, bsl, tsl, ssl, (K, G), xp=xp)
            keep = self.keep(bsl, tsl, ssl) if self.plan.dropout_key is not None else None
            # The front of the tile, contiguous, so that a shorter last chunk needs no strides.
            out = None if tile is None else xp.reshape(tile[:rows * ns], (nb, K, nt * G, ns))
            m, l, acc = self.step(qb, kb, vb, m, l, acc, bias, allowed, keep, self.scalars, out,
                                  be=self.be, keep_scale=self.keep_scale, fixed_order=self.plan.batch_invariant,
                                  softcap=self.plan.softcap)
        return m, l, acc

    def key_chunk(self, bsl: slice, tsl: slice, ssl: slice) -> tuple[Any, Any, Any]:
        """Keys ``[b, s, K, H]`` and values ``[b, s, K, V]`` of chunk ``ssl`` for block ``(bsl, tsl)``, those no query of
        the block may see zeroed (``hide_keys``), and ``allowed`` (None when every query sees every key); quantized
        ones dequantized (``dequantize``)."""
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

    def normalize(self, m: Any, l: Any, acc: Any, *, split: bool = False) -> tuple[Any, ...]:
        """A state's output rows ``[b, t, N, V]`` and log-sum-exp ``[b, t, N]``, both in the compute dtype; rows with
        no visible key give 0 and ``-inf``. With ``split``, the log-sum-exp as its two terms ``(m, log l)`` (for
        ``merge_partials``' ``bases``)."""
        xp, (nb, K, nt, G, _), c = self.xp, m.shape, self.scalars
        empty = l == c.zero  # fully masked rows: acc is 0
        res = self.unfold(acc / xp.reshape(xp.where(empty, c.one, l), (nb, K, nt * G, 1)), nt)
        log_l = xp.log(xp.where(empty, c.one, l))
        rows = (lambda a: xp.reshape(xp.permute_dims(a, (0, 2, 1, 3, 4)), (nb, nt, self.N)))  # noqa: E731
        if split:
            return res, rows(m), rows(log_l)
        return res, rows(xp.where(empty, c.neg_inf, m + log_l))

    def finish(self, m: Any, l: Any, acc: Any) -> tuple[Any, Any]:
        """``normalize`` with the output in the input dtype, and the log-sum-exp only with ``plan.with_lse``."""
        res, lse = self.normalize(m, l, acc)
        res = self.xp.astype(res, self.q.dtype) if res.dtype != self.q.dtype else res
        return res, (lse if self.plan.with_lse else None)


def _online_softmax_step(qb: Any, kb: Any, vb: Any, m: Any, l: Any, acc: Any, bias: Any, allowed: Any, keep: Any,
                         scalars: Scalars, tile: Any, *, be: Backend, keep_scale: float,
                         fixed_order: bool, softcap: float | None = None) -> tuple[Any, Any, Any]:
    """One key chunk of the online softmax: scores ``q k^T``, then the running max ``m [b,K,t,G,1]``, sum ``l``
    and rescaled accumulator ``acc [b,K,t*G,V]`` updated (in place where the library can).

    ``bias``, ``allowed`` and ``keep`` (dropout) are ``[b,K,t,G,s]`` blocks or None; ``scalars`` holds
    ``-inf``, 0 and 1 (``Scalars``); ``tile`` is a ``[b,K,t*G,s]`` buffer the scores
    may be written into, or None; ``fixed_order`` makes both products ``batch_invariant`` ones; ``softcap``
    caps the scaled logits (``c * tanh(logits / c)``) before bias and masks.
    """
    xp = be.xp
    neg_inf, zero, _ = scalars
    nb, K, nt, G, _ = m.shape
    kv_chunk = kb.shape[-1]
    if kb.dtype != qb.dtype:
        kb, vb = xp.astype(kb, qb.dtype), xp.astype(vb, qb.dtype)
    if tile is None:
        scores = be.matmul(qb, kb, fixed_order=fixed_order)
    else:
        be.matmul_into(qb, kb, tile, fixed_order=fixed_order)
        scores = tile
    scores = xp.reshape(scores, (nb, K, nt, G, kv_chunk))
    if softcap is not None:
        scores = xp.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + xp.astype(bias, qb.dtype)
    if allowed is not None:
        scores = xp.where(allowed, scores, neg_inf)
    p, m, l, acc = be.online_softmax(scores, m, l, acc, scalars)  # every array here is this block's own
    if keep is not None:
        p = xp.where(keep, p, zero) * keep_scale
    acc += be.matmul(xp.reshape(p, (nb, K, nt * G, kv_chunk)), vb, fixed_order=fixed_order)
    return m, l, acc
