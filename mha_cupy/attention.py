"""The public attention functions: a call described and checked once (``_call``), planned (``_plan``) and routed
(``_route``) to the chunk loops.

The letters of every shape in the package, its docstrings and its messages:

- B batch (for the layer, all leading dimensions flattened; lower-case b: the batch rows of one block or part),
- T query length, S key length (L: either),
- N query heads, K key/value heads, G = N // K query heads per key/value head,
- H key size (``d_k``), V value size (``d_v``), E the layer's input and output size (``emsize``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from . import _route
from ._backends import backend_of
from ._call import VJP_EXCLUDED, AttentionCall, check_call, signature
from ._merge import merge_partials
from ._plan import plan_attention
from ._validation import check_array, check_shape_and_dtype, keyword_hints

__all__ = ["scaled_dot_product_attention", "scaled_dot_product_attention_vjp", "merge_attention"]


def scaled_dot_product_attention(q: Any, k: Any, v: Any, **options: Any) -> Any:
    """Attention of ``q [B, T, N, H]`` over ``k [B, S, K, H]``, ``v [B, S, K, V]``, in memory-bounded chunks.

    The layout is batch, sequence, heads, head size (TabPFN's ``(B, S, H, D)``), not torch's ``[B, N, T, H]``:
    from torch, pass ``q.permute(0, 2, 1, 3)`` (and the same for k, v and back for the output).

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
        Bytes (or ``"256MB"``, ``"64MiB"``) for the attention's working set;
        default ``mha_cupy.get_memory_budget(xp, device)``: 32 MiB on CPUs, a
        quarter of the free memory on accelerators, unless changed with
        ``set_memory_budget``. With several workers each block gets an equal share.
    workers : int, optional
        Threads over independent (batch, query) blocks; default the number of
        cores for NumPy (BLAS then runs single-threaded inside each) and 1 for
        libraries that parallelise by themselves (PyTorch, CuPy, JAX). When
        there are fewer (batch, query) blocks than workers, the keys are split
        between them and the partial results merged by log-sum-exp.
    return_lse : bool
        Also return the log-sum-exp of each query row's scaled, biased and
        masked logits.
    batch_invariant : bool
        Every output row is bitwise the same whatever else is in the call
        (other batch rows and their lengths, other queries, the query length,
        chunk sizes, workers) on the same machine and library versions:
        fixed-order products row by row, whole key chunks of 512 from key 0,
        no key splits (on NumPy with numba one fused kernel per chunk).
        Costs ×1.1-1.7 on NumPy, more for a few queries over many keys (the
        user guide's "Batch invariance", ``docs/guide/options.md``, says what
        is promised).
    k_scale, v_scale : float or array, optional
        Keys and values stored quantized (TabPFN 9's KV caches): ``k`` of
        dtype int8 or float8_e4m3fn (NumPy's through ml_dtypes) holds
        ``keys / k_scale``. The scale is a number or an array of shape ``[]``,
        ``[B]`` or ``[B, 1, 1, 1]`` (one per batch row). Each key chunk is
        dequantized inside the loop (``k.astype(q.dtype) * k_scale``, as
        TabPFN's ``QuantizedKVCacheEntry.dequantize``), never the whole of
        ``k``. Not with gradients, nor on Dask yet.
    q_seq_lengths, kv_seq_lengths : integer array ``[B]``, optional
        Variable-length batches: row b has ``q_seq_lengths[b]`` queries and
        ``kv_seq_lengths[b]`` keys, the rest being padding. Queries past their
        row's length give 0 (log-sum-exp ``-inf``, zero gradients); keys past
        it are never attended, and key chunks wholly past it are skipped.
        Causal masks and windows align each row bottom-right by its lengths:
        query t of row b sits at key ``p(t) = t + kv_seq_lengths[b] - q_seq_lengths[b]``.
    local_window_size : int or ``(left, right)``, optional
        Sliding window: query t sees keys ``p(t) - left <= s <= p(t) + right``
        (an int w means ``(w, w)``), with ``p(t) = t + S - T`` or its per-row
        form above; combined with ``is_causal`` and ``mask``. Key chunks
        outside every query's window are skipped.
    softcap : float, optional
        Logit soft-capping (Gemma 2, FlashAttention's ``softcap``): the scaled
        logits become ``softcap * tanh(logits / softcap)``, before ``bias`` and
        the masks; gradients flow through it.

    Returns
    -------
    array, shape ``[B, T, N, V]``, or ``(out, lse)`` with ``return_lse``
        Same library, device and dtype as ``q``; ``lse [B, T, N]`` is float32
        (float64 for float64 inputs), ``-inf`` for a row with no visible key.
        Logits, softmax and accumulation run in float32 or wider. A query row
        that may attend no key (fully masked) returns zeros, where PyTorch
        returns NaN.

    Examples
    --------
    Eight query heads over two key/value heads (grouped-query attention), causal, in a working set of 1 MiB:

    >>> import numpy as np
    >>> import mha_cupy
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 128, 8, 16), dtype=np.float32)
    >>> k, v = rng.standard_normal((2, 2, 128, 2, 16), dtype=np.float32)
    >>> out, lse = mha_cupy.scaled_dot_product_attention(q, k, v, is_causal=True, memory_budget="1MiB",
    ...                                                  return_lse=True)
    >>> out.shape, out.dtype, lse.shape
    ((2, 128, 8, 16), dtype('float32'), (2, 128, 8))

    The same, written out in float64 (query head ``n`` reads key head ``n // 4``):

    >>> qg = q.astype(np.float64).reshape(2, 128, 2, 4, 16)             # [B, T, K, G, H]
    >>> logits = np.einsum("btkgh,bskh->bkgts", qg, k) / np.sqrt(16)
    >>> logits = np.where(np.tril(np.ones((128, 128), bool)), logits, -np.inf)
    >>> w = np.exp(logits - logits.max(-1, keepdims=True))
    >>> expected = np.einsum("bkgts,bskv->btkgv", w / w.sum(-1, keepdims=True), v).reshape(2, 128, 8, 16)
    >>> mha_cupy.compare(out, expected).ok
    True
    """
    checked = check_call(AttentionCall.of(q, k, v, options, where="scaled_dot_product_attention()"))
    be, problem = checked.be, checked.problem
    gradient = be.needs_grad(checked.q, checked.k, checked.v)
    def backward_plan() -> Any:  # planned when the backward runs: a forward alone keeps the forward's budget rules
        return plan_attention(dataclasses.replace(problem, backward=True))

    return _route.forward(checked.q, checked.k, checked.v, be=be, plan=plan_attention(problem), mask=checked.mask,
                          bias=checked.bias, scales=checked.scales, gradient=gradient, backward_plan=backward_plan)


scaled_dot_product_attention.__signature__ = signature(("q", "k", "v"), "Any")  # type: ignore[attr-defined]


def scaled_dot_product_attention_vjp(q: Any, k: Any, v: Any, d_out: Any, **options: Any) -> tuple[Any, Any, Any]:
    """Gradients of ``sum(scaled_dot_product_attention(q, k, v, ...) * d_out)`` with respect to q, k and v.

    Layouts ``q [B, T, N, H]``, ``k [B, S, K, H]``, ``v [B, S, K, V]``, ``d_out [B, T, N, V]`` (batch, sequence,
    heads, head size; torch's ``[B, N, T, H]`` needs ``permute(0, 2, 1, 3)``).

    The FlashAttention-2 backward as chunk loops: the forward's output and
    log-sum-exp are computed once, then every score tile is recomputed from
    them, never materialising ``[T, S]``; the working set follows
    ``memory_budget`` like the forward's. ``mask``, ``is_causal`` and ``bias``
    act as in the forward (``bias`` is a constant: no gradient); dropout uses
    the forward's Philox mask, so ``seed`` is required with ``dropout_p > 0``.
    Rows with no visible key get zero gradients.

    Parameters
    ----------
    q, k, v
        As in :func:`scaled_dot_product_attention`: ``[B, T, N, H]``, ``[B, S, K, H]``, ``[B, S, K, V]``.
    d_out : array, shape ``[B, T, N, V]``
        Gradient of the output; same library, device and dtype as ``q``.
    scale, dropout_p, seed, mask, bias, is_causal, q_chunk_size, kv_chunk_size, memory_budget, workers
        As in :func:`scaled_dot_product_attention`.
    q_seq_lengths, kv_seq_lengths, local_window_size, softcap
        As in :func:`scaled_dot_product_attention`: padded queries and keys get zero gradients.

    Returns
    -------
    (dq, dk, dv)
        Arrays of ``q``'s, ``k``'s and ``v``'s shapes, in ``q``'s library, device and dtype. Grouped
        heads' gradients are summed over each group (``dk``, ``dv`` have K heads).

    Examples
    --------
    >>> import numpy as np
    >>> import mha_cupy
    >>> rng = np.random.default_rng(0)
    >>> q, k, v, d_out = rng.standard_normal((4, 1, 64, 2, 8))
    >>> dq, dk, dv = mha_cupy.scaled_dot_product_attention_vjp(q, k, v, d_out, is_causal=True)
    >>> dq.shape, dk.shape, dv.shape
    ((1, 64, 2, 8), (1, 64, 2, 8), (1, 64, 2, 8))

    A central difference along a random direction agrees with ``dq``:

    >>> def f(x):
    ...     return float((mha_cupy.scaled_dot_product_attention(x, k, v, is_causal=True) * d_out).sum())
    >>> e = rng.standard_normal(q.shape)
    >>> slope = (f(q + 1e-6 * e) - f(q - 1e-6 * e)) / 2e-6
    >>> bool(abs(slope - float((dq * e).sum())) < 1e-6 * max(1.0, abs(slope)))
    True
    """
    where = "scaled_dot_product_attention_vjp"
    checked = check_call(AttentionCall.of(q, k, v, options, where=f"{where}()", excluded=VJP_EXCLUDED), d_out=d_out)
    _, grads = _route.vjp(checked.q, checked.k, checked.v, checked.d_out, be=checked.be,
                          plan=plan_attention(checked.problem), mask=checked.mask, bias=checked.bias, vjp_of=where)
    return grads


scaled_dot_product_attention_vjp.__signature__ = signature(  # type: ignore[attr-defined]
    ("q", "k", "v", "d_out"), "tuple[Any, Any, Any]", excluded=VJP_EXCLUDED)


@keyword_hints
def merge_attention(outs: Any, lses: Any) -> tuple[Any, Any]:
    """Attention over the union of disjoint key sets, from the results over each set (xformers' ``merge_attentions``).

    Parameters
    ----------
    outs : sequence of arrays, each ``[..., V]`` (for example ``[B, T, N, V]``)
        Outputs of ``scaled_dot_product_attention(..., return_lse=True)`` over
        disjoint sets of keys, of one library, device, dtype and shape.
    lses : sequence of arrays, each ``[...]`` (``[B, T, N]``)
        Their log-sum-exps, of one real floating dtype (``-inf``: the row saw no key).

    Returns
    -------
    (out, lse)
        ``lse = log sum_i exp(lse_i)`` and ``out = sum_i exp(lse_i - lse) out_i``,
        computed in the dtype of ``lses`` (float32 or wider from
        ``return_lse``); ``out`` in the dtype of ``outs``. Rows no part saw give
        ``out = 0`` and ``lse = -inf``. Exact up to rounding; the same bits for the
        same parts in the same order. This is the merge the Dask path and
        split key ranges use.

    Raises
    ------
    ValueError, TypeError
        No parts, different numbers of outputs and log-sum-exps, or parts of
        different shapes, dtypes, libraries or devices.

    Examples
    --------
    Attention over 16 keys from its results over keys 0-9 and 10-15:

    >>> import numpy as np
    >>> import mha_cupy
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((1, 4, 2, 8))
    >>> k, v = rng.standard_normal((2, 1, 16, 2, 8))
    >>> parts = [mha_cupy.scaled_dot_product_attention(q, k[:, s], v[:, s], return_lse=True)
    ...          for s in (slice(0, 10), slice(10, 16))]
    >>> out, lse = mha_cupy.merge_attention([o for o, _ in parts], [l for _, l in parts])
    >>> out.shape, lse.shape
    ((1, 4, 2, 8), (1, 4, 2))
    >>> mha_cupy.compare(out, mha_cupy.scaled_dot_product_attention(q, k, v)).ok
    True
    """
    outs, lses = list(_as_parts(outs, "outs")), list(_as_parts(lses, "lses"))
    if len(outs) != len(lses):
        msg = f"outs and lses must have one entry per part, got {len(outs)} outs and {len(lses)} lses"
        raise ValueError(msg)
    names = tuple(f"outs[{i}]" for i in range(len(outs))) + tuple(f"lses[{i}]" for i in range(len(lses)))
    be = backend_of(*outs, *lses, names=names)
    for i, (out, lse) in enumerate(zip(outs, lses)):
        check_shape_and_dtype(out, f"outs[{i}]", tuple(outs[0].shape), legend="[..., d_v] like outs[0]",
                              dtype=outs[0].dtype, be=be)
        check_shape_and_dtype(lse, f"lses[{i}]", tuple(outs[0].shape[:-1]), legend="outs[0]'s shape without d_v",
                              dtype=lses[0].dtype, be=be)
    if not outs[0].ndim:
        msg = "outs must have at least one dimension [..., d_v], got 0-d arrays"
        raise ValueError(msg)
    xp = be.xp
    out, lse = merge_partials([xp.astype(o, lses[0].dtype, copy=False) for o in outs], lses, xp=xp)
    return xp.astype(out, outs[0].dtype, copy=False), lse


def _as_parts(parts: Any, name: str) -> tuple[Any, ...]:
    if not isinstance(parts, (list, tuple)):
        msg = f"{name} must be a non-empty list or tuple of arrays, got {type(parts).__name__}"
        raise TypeError(msg)
    if not parts:
        msg = f"{name} must hold at least one array, got an empty {type(parts).__name__}"
        raise ValueError(msg)
    for i, a in enumerate(parts):
        check_array(a, f"{name}[{i}]")
    return tuple(parts)
