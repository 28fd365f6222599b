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
from ._namespace import compute_dtype, device_of, dtype_name, namespace_of
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
        default ``mha_cupy.get_memory_budget()``.

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
    plan = plan_chunks(
        batch=B, q_len=T, kv_len=S, heads=N, d_k=H, d_v=v.shape[3],
        compute_itemsize=_itemsize(compute_dtype(q.dtype, xp), xp),
        dropout=dropout_p > 0, masked=mask is not None or is_causal,
        memory_budget=memory_budget, q_chunk_size=q_chunk_size, kv_chunk_size=kv_chunk_size,
    )
    return attend(q, k, v, xp=xp, scale=scale, plan=plan, dropout_p=dropout_p, seed=seed,
                  mask=mask, bias=bias, is_causal=is_causal)


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


def _itemsize(dtype: Any, xp: Any) -> int:
    return 8 if dtype == xp.float64 else 4


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
) -> Any:
    """The chunked core on validated arrays (see ``scaled_dot_product_attention``).

    ``mask`` and ``bias`` are 4-D (``check_mask``); ``batch_offset`` is added to
    batch indices for the dropout counter when ``q`` is a slice of a larger batch.
    """
    B, T, N, H = q.shape
    S, K, V = k.shape[1], k.shape[2], v.shape[3]
    G = N // K
    dev = device_of(q)
    cdt = compute_dtype(q.dtype, xp)
    out = xp.empty((B, T, N, V), dtype=q.dtype, device=dev)
    neg_inf = xp.asarray(-math.inf, dtype=cdt, device=dev)
    zero = xp.asarray(0.0, dtype=cdt, device=dev)
    one = xp.asarray(1.0, dtype=cdt, device=dev)
    use_dropout = dropout_p > 0.0
    keep_scale = 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0
    shift = S - T  # bottom-right causal alignment
    if use_dropout:
        heads_idx = xp.reshape(xp.arange(N, dtype=xp.int64, device=dev), (1, K, 1, G, 1))

    for b0 in range(0, B, plan.batch):
        b1 = min(B, b0 + plan.batch)
        nb = b1 - b0
        for t0 in range(0, T, plan.q):
            t1 = min(T, t0 + plan.q)
            nt = t1 - t0
            s_end = max(0, min(S, t1 - 1 + shift + 1)) if is_causal else S
            qb = xp.reshape(q[b0:b1, t0:t1, ...], (nb, nt, K, G, H))
            qb = xp.permute_dims(qb, (0, 2, 1, 3, 4))
            qb = xp.reshape(xp.astype(qb, cdt), (nb, K, nt * G, H)) * scale
            m = xp.full((nb, K, nt, G, 1), -math.inf, dtype=cdt, device=dev)
            l = xp.zeros((nb, K, nt, G, 1), dtype=cdt, device=dev)
            acc = xp.zeros((nb, K, nt * G, V), dtype=cdt, device=dev)
            for s0 in range(0, s_end, plan.kv):
                s1 = min(s_end, s0 + plan.kv)
                ns = s1 - s0
                kb = xp.permute_dims(k[b0:b1, s0:s1, ...], (0, 2, 3, 1))  # [b, K, H, s]
                vb = xp.permute_dims(v[b0:b1, s0:s1, ...], (0, 2, 1, 3))  # [b, K, s, V]
                if kb.dtype != cdt:
                    kb, vb = xp.astype(kb, cdt), xp.astype(vb, cdt)
                scores = xp.reshape(xp.matmul(qb, kb), (nb, K, nt, G, ns))
                bsl, tsl, ssl = slice(b0, b1), slice(t0, t1), slice(s0, s1)
                if bias is not None:
                    scores = scores + xp.astype(_block_of(bias, bsl, tsl, ssl, (K, G), xp=xp), cdt)
                allowed = None
                if mask is not None:
                    allowed = _block_of(mask, bsl, tsl, ssl, (K, G), xp=xp)
                if is_causal and s1 - 1 > t0 + shift:  # some key in this chunk is hidden from some query
                    ti = xp.reshape(xp.arange(t0, t1, dtype=xp.int64, device=dev), (1, 1, nt, 1, 1))
                    sj = xp.reshape(xp.arange(s0, s1, dtype=xp.int64, device=dev), (1, 1, 1, 1, ns))
                    causal = sj <= ti + shift
                    allowed = causal if allowed is None else xp.logical_and(allowed, causal)
                if allowed is not None:
                    scores = xp.where(allowed, scores, neg_inf)
                m_new = xp.maximum(m, xp.max(scores, axis=-1, keepdims=True))
                m_safe = xp.where(m_new == neg_inf, zero, m_new)  # rows with nothing visible yet
                p = xp.exp(scores - m_safe)
                alpha = xp.exp(m - m_safe)
                l = l * alpha + xp.sum(p, axis=-1, keepdims=True)
                if use_dropout:
                    bi = xp.reshape(xp.arange(b0 + batch_offset, b1 + batch_offset, dtype=xp.int64, device=dev), (nb, 1, 1, 1, 1))
                    ti = xp.reshape(xp.arange(t0, t1, dtype=xp.int64, device=dev), (1, 1, nt, 1, 1))
                    sj = xp.reshape(xp.arange(s0, s1, dtype=xp.int64, device=dev), (1, 1, 1, 1, ns))
                    keep = _dropout.keep_mask(seed, dropout_p, bi, heads_idx, ti, sj)
                    p = xp.where(keep, p, zero) * keep_scale
                acc = acc * xp.reshape(alpha, (nb, K, nt * G, 1)) + xp.matmul(xp.reshape(p, (nb, K, nt * G, ns)), vb)
                m = m_new
            l = xp.where(l == zero, one, l)  # fully masked rows: acc is 0, output 0
            res = xp.reshape(acc / xp.reshape(l, (nb, K, nt * G, 1)), (nb, K, nt, G, V))
            res = xp.reshape(xp.permute_dims(res, (0, 2, 1, 3, 4)), (nb, nt, N, V))
            out[b0:b1, t0:t1, ...] = xp.astype(res, q.dtype) if res.dtype != q.dtype else res
    return out
