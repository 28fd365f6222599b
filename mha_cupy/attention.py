"""Scaled dot-product attention as explicit chunk loops with an online softmax.

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

import math
from typing import Any

from . import dropout as _dropout
from ._budget import ChunkPlan, plan_chunks
from ._namespace import compute_dtype, device_of, dtype_name, is_cpu, itemsize, namespace_of
from ._threads import resolve_workers, run_blocks
from ._validation import check_bool, check_probability, check_shape_and_dtype, shape_str

__all__ = ["scaled_dot_product_attention", "attend", "check_mask"]


def scaled_dot_product_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    mask: Any = None,
    bias: Any = None,
    is_causal: bool = False,
    q_chunk_size: int | None = None,
    kv_chunk_size: int | None = None,
    memory_budget: int | str | None = None,
    workers: int | None = None,
) -> Any:
    """Attention of ``q`` over ``k``/``v``, computed in memory-bounded chunks.

    Parameters
    ----------
    q : array, shape ``[B, T, N, H]``
        Queries.
    k : array, shape ``[B, S, K, H]``
        Keys; ``N`` must be a multiple of ``K``. Query head ``n`` uses key
        head ``n // (N // K)`` (TabPFN's and PyTorch's ``enable_gqa`` grouping).
    v : array, shape ``[B, S, K, V]``
        Values.
    scale : float, optional
        Logit scale; default ``1 / sqrt(H)``.
    dropout_p : float
        Probability of dropping an attention weight (after the softmax, kept
        weights scaled by ``1 / (1 - dropout_p)``). Applied whenever it is
        positive; the keep decision for weight ``(b, n, t, s)`` is a pure
        function of ``(seed, b, n, t, s)`` (Philox4x32-10), the same on every
        library and at every chunking.
    seed : int, optional
        64-bit dropout seed; ``None`` draws one from the operating system.
    mask : bool array, optional
        True where a query may attend a key; broadcastable to ``[B, T, N, S]``.
    bias : float array, optional
        Added to the logits; broadcastable to ``[B, T, N, S]``, dtype of ``q``.
    is_causal : bool
        Causal mask aligned to the bottom-right corner: query ``t`` sees keys
        ``s <= t + (S - T)`` (PyTorch's ``causal_lower_right``; the usual
        causal mask when ``T == S``). Key chunks hidden entirely are skipped.
    q_chunk_size, kv_chunk_size : int, optional
        Block sizes; by default chosen from ``memory_budget``. The result does
        not depend on them beyond rounding.
    memory_budget : int or str, optional
        Bytes (or ``"256MB"``, ``"64MiB"``) for one block's working set;
        default ``mha_cupy.get_memory_budget()``. With several workers each
        block gets an equal share.
    workers : int, optional
        Threads over independent (batch, query) blocks; default the number of
        cores for NumPy (BLAS then runs single-threaded inside each) and 1 for
        libraries that parallelise by themselves (PyTorch, CuPy).

    Returns
    -------
    array, shape ``[B, T, N, V]``
        Same library, device and dtype as ``q``. Logits, softmax and
        accumulation run in float32 or wider. A query row that may attend no
        key (fully masked) returns zeros, where PyTorch returns NaN.
    """
    xp = namespace_of(q, k, v, mask, bias, names=("q", "k", "v", "mask", "bias"))
    check_shape_and_dtype(q, "q", (None, None, None, None), legend="[batch, q_len, heads, d_k]", xp=xp)
    B, T, N, H = q.shape
    check_shape_and_dtype(k, "k", (B, None, None, H), legend="[batch, kv_len, kv_heads, d_k]", dtype=q.dtype, xp=xp)
    S, K = k.shape[1], k.shape[2]
    check_shape_and_dtype(v, "v", (B, S, K, None), legend="[batch, kv_len, kv_heads, d_v]", dtype=q.dtype, xp=xp)
    if K == 0 or N % K:
        msg = f"q heads must be a multiple of k/v heads: q has {N} heads, got k/v with {K}"
        raise ValueError(msg)
    scale = check_scale(scale, H)
    dropout_p = check_probability(dropout_p, "dropout_p")
    if dropout_p > 0 and seed is None:
        seed = _dropout.random_seed()
    if seed is not None:
        _dropout.split_seed(seed)
    is_causal = check_bool(is_causal, "is_causal")
    mask = check_mask(mask, "mask", (B, T, N, S), xp=xp)
    bias = check_mask(bias, "bias", (B, T, N, S), xp=xp, dtype=q.dtype)
    workers = resolve_workers(workers, xp)
    plan = plan_chunks(
        batch=B, q_len=T, kv_len=S, heads=N, d_k=H, d_v=v.shape[3],
        compute_itemsize=itemsize(compute_dtype(q.dtype, xp), xp),
        dropout=dropout_p > 0, masked=mask is not None or is_causal,
        memory_budget=memory_budget, q_chunk_size=q_chunk_size, kv_chunk_size=kv_chunk_size, workers=workers,
        on_cpu=is_cpu(xp, device_of(q)),
    )
    return attend(q, k, v, xp=xp, scale=scale, plan=plan, dropout_p=dropout_p, seed=seed,
                  mask=mask, bias=bias, is_causal=is_causal, workers=workers)


def check_scale(scale: Any, d_k: int) -> float:
    """The logit scale: ``scale`` if given (a finite real number), else ``1 / sqrt(d_k)``."""
    if scale is None:
        return 1.0 / math.sqrt(d_k) if d_k else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        msg = f"scale must be a finite float or None, got {type(scale).__name__} {scale!r}"
        raise TypeError(msg)
    if not math.isfinite(scale):
        msg = f"scale must be a finite float or None, got {scale!r}"
        raise ValueError(msg)
    return float(scale)


def check_mask(x: Any, name: str, full: tuple[int, int, int, int], *, xp: Any, dtype: Any = None) -> Any:
    """Validate a mask (bool) or bias (``dtype``) broadcastable to ``full`` = ``[B, T, N, S]``; return it as 4-D."""
    if x is None:
        return None
    if dtype is None and x.dtype != xp.bool:
        msg = f"{name} must be a bool array (True = attend), got dtype {dtype_name(x.dtype)}"
        raise TypeError(msg)
    if dtype is not None and x.dtype != dtype:
        msg = f"{name} must have the dtype of q ({dtype_name(dtype)}), got {dtype_name(x.dtype)}"
        raise TypeError(msg)
    shape = tuple(x.shape)
    if len(shape) > 4 or any(s not in (1, f) for s, f in zip(shape[::-1], full[::-1])):
        msg = f"{name} must broadcast to [batch, q_len, heads, kv_len] = {shape_str(full)}, got shape {shape_str(shape)}"
        raise ValueError(msg)
    return xp.reshape(x, (1,) * (4 - len(shape)) + shape)


def _slice_or_all(size: int, start: int, stop: int) -> slice:
    return slice(None) if size == 1 else slice(start, stop)


def _block_of(x: Any, b: slice, t: slice, s: slice, groups: tuple[int, int], *, xp: Any) -> Any:
    """The ``[b', K', t', G', s']`` block of a 4-D mask/bias ``[B|1, T|1, N|1, S|1]`` for the folded layout."""
    mb, mt, mn, ms = x.shape
    blk = x[_slice_or_all(mb, b.start, b.stop), _slice_or_all(mt, t.start, t.stop), :, _slice_or_all(ms, s.start, s.stop)]
    kh, g = groups if mn != 1 else (1, 1)
    blk = xp.reshape(blk, (blk.shape[0], blk.shape[1], kh, g, blk.shape[3]))
    return xp.permute_dims(blk, (0, 2, 1, 3, 4))


def attend(
    q: Any,
    k: Any,
    v: Any,
    *,
    xp: Any,
    scale: float,
    plan: ChunkPlan,
    dropout_p: float = 0.0,
    seed: int | None = None,
    mask: Any = None,
    bias: Any = None,
    is_causal: bool = False,
    batch_offset: int = 0,
    workers: int = 1,
) -> Any:
    """The chunked core on validated arrays (see ``scaled_dot_product_attention``).

    ``mask`` and ``bias`` are 4-D (``check_mask``); ``batch_offset`` is added to
    batch indices for the dropout counter when ``q`` is a slice of a larger batch.
    ``workers`` > 1 runs independent (batch, query) blocks on a thread pool; each
    block writes its own slice of the output, so the result does not depend on it.
    """
    B, T, N, _ = q.shape
    V = v.shape[3]
    out = xp.empty((B, T, N, V), dtype=q.dtype, device=device_of(q))
    core = _Core(q, k, v, out, xp=xp, scale=scale, kv_chunk=plan.kv, dropout_p=dropout_p, seed=seed, mask=mask,
                 bias=bias, is_causal=is_causal, batch_offset=batch_offset)
    blocks = [(b0, min(B, b0 + plan.batch), t0, min(T, t0 + plan.q))
              for b0 in range(0, B, plan.batch) for t0 in range(0, T, plan.q)]
    run_blocks(core.block, blocks, workers)
    return out


class _Core:
    """One attention problem; ``block`` computes the rows of one (batch, query) block."""

    def __init__(self, q: Any, k: Any, v: Any, out: Any, *, xp: Any, scale: float, kv_chunk: int, dropout_p: float,
                 seed: int | None, mask: Any, bias: Any, is_causal: bool, batch_offset: int) -> None:
        self.q, self.k, self.v, self.out, self.xp = q, k, v, out, xp
        self.scale, self.kv_chunk, self.mask, self.bias, self.is_causal = scale, kv_chunk, mask, bias, is_causal
        self.dropout_p, self.seed, self.batch_offset = dropout_p, seed, batch_offset
        self.N, self.H = q.shape[2], q.shape[3]
        self.S, self.K, self.V = k.shape[1], k.shape[2], v.shape[3]
        self.G = self.N // self.K
        self.shift = self.S - q.shape[1]  # bottom-right causal alignment
        self.dev = device_of(q)
        cdt = self.cdt = compute_dtype(q.dtype, xp)
        self.neg_inf = xp.asarray(-math.inf, dtype=cdt, device=self.dev)
        self.zero = xp.asarray(0.0, dtype=cdt, device=self.dev)
        self.one = xp.asarray(1.0, dtype=cdt, device=self.dev)
        self.keep_scale = 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0
        if dropout_p > 0.0:
            self.heads_idx = xp.reshape(xp.arange(self.N, dtype=xp.int64, device=self.dev), (1, self.K, 1, self.G, 1))

    def _index(self, start: int, stop: int, axis: int) -> Any:
        """``arange(start, stop)`` as int64 along ``axis`` of a 5-D ``[b, K, t, G, s]`` layout."""
        shape = [1] * 5
        shape[axis] = stop - start
        return self.xp.reshape(self.xp.arange(start, stop, dtype=self.xp.int64, device=self.dev), tuple(shape))

    def block(self, b0: int, b1: int, t0: int, t1: int) -> None:
        xp, K, G, H, V, cdt = self.xp, self.K, self.G, self.H, self.V, self.cdt
        nb, nt = b1 - b0, t1 - t0
        s_end = max(0, min(self.S, t1 + self.shift)) if self.is_causal else self.S
        qb = xp.reshape(self.q[b0:b1, t0:t1, ...], (nb, nt, K, G, H))
        qb = xp.permute_dims(qb, (0, 2, 1, 3, 4))
        qb = xp.reshape(xp.astype(qb, cdt), (nb, K, nt * G, H)) * self.scale
        m = xp.full((nb, K, nt, G, 1), -math.inf, dtype=cdt, device=self.dev)
        l = xp.zeros((nb, K, nt, G, 1), dtype=cdt, device=self.dev)
        acc = xp.zeros((nb, K, nt * G, V), dtype=cdt, device=self.dev)
        for s0 in range(0, s_end, self.kv_chunk):
            s1 = min(s_end, s0 + self.kv_chunk)
            ns = s1 - s0
            kb = xp.permute_dims(self.k[b0:b1, s0:s1, ...], (0, 2, 3, 1))  # [b, K, H, s]
            vb = xp.permute_dims(self.v[b0:b1, s0:s1, ...], (0, 2, 1, 3))  # [b, K, s, V]
            if kb.dtype != cdt:
                kb, vb = xp.astype(kb, cdt), xp.astype(vb, cdt)
            scores = xp.reshape(xp.matmul(qb, kb), (nb, K, nt, G, ns))
            bsl, tsl, ssl = slice(b0, b1), slice(t0, t1), slice(s0, s1)
            if self.bias is not None:
                scores = scores + xp.astype(_block_of(self.bias, bsl, tsl, ssl, (K, G), xp=xp), cdt)
            allowed = None
            if self.mask is not None:
                allowed = _block_of(self.mask, bsl, tsl, ssl, (K, G), xp=xp)
            if self.is_causal and s1 - 1 > t0 + self.shift:  # some key in this chunk is hidden from some query
                causal = self._index(s0, s1, 4) <= self._index(t0, t1, 2) + self.shift
                allowed = causal if allowed is None else xp.logical_and(allowed, causal)
            if allowed is not None:
                scores = xp.where(allowed, scores, self.neg_inf)
            m_new = xp.maximum(m, xp.max(scores, axis=-1, keepdims=True))
            m_safe = xp.where(m_new == self.neg_inf, self.zero, m_new)  # rows with nothing visible yet
            scores -= m_safe  # in place: every array updated in place here is this block's own
            p = xp.exp(scores)
            alpha = xp.exp(m - m_safe)
            l *= alpha
            l += xp.sum(p, axis=-1, keepdims=True)
            if self.dropout_p > 0.0:
                bo = self.batch_offset
                keep = _dropout.keep_mask(self.seed, self.dropout_p, self._index(b0 + bo, b1 + bo, 0), self.heads_idx,
                                          self._index(t0, t1, 2), self._index(s0, s1, 4))
                p = xp.where(keep, p, self.zero) * self.keep_scale
            acc *= xp.reshape(alpha, (nb, K, nt * G, 1))
            acc += xp.matmul(xp.reshape(p, (nb, K, nt * G, ns)), vb)
            m = m_new
        l = xp.where(l == self.zero, self.one, l)  # fully masked rows: acc is 0, output 0
        res = xp.reshape(acc / xp.reshape(l, (nb, K, nt * G, 1)), (nb, K, nt, G, V))
        res = xp.reshape(xp.permute_dims(res, (0, 2, 1, 3, 4)), (nb, nt, self.N, V))
        self.out[b0:b1, t0:t1, ...] = xp.astype(res, self.out.dtype) if res.dtype != self.out.dtype else res
