"""The public attention function: validate once, resolve a plan, run the chunked core.

Letters: B batch, T query length, S key length, N query heads, K key/value
heads, H key size (d_k), V value size (d_v).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

from ._backends import backend_of, device_of
from ._backward import attend_backward
from ._core import attend, plan_attention
from ._lazy import run_attention
from ._merge import merge_partials
from ._random import random_seed, split_seed
from ._validation import (keyword_hints, check_array, check_bool, check_lengths, check_mask, check_probability, check_quantized,
                          check_scale, check_shape_and_dtype, check_softcap, check_window)

__all__ = ["scaled_dot_product_attention", "scaled_dot_product_attention_vjp", "merge_attention"]


@keyword_hints
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
    return_lse: bool = False,
    batch_invariant: bool = False,
    k_scale: Any = None,
    v_scale: Any = None,
    q_seq_lengths: Any = None,
    kv_seq_lengths: Any = None,
    local_window_size: int | tuple[int, int] | None = None,
    softcap: float | None = None,
) -> Any:
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
        (other batch rows, other queries, the query length, chunk sizes,
        workers), on any CPU and BLAS: fixed-order products row by row, fixed
        tiles of 32 queries (the last padded) by 512 keys, no key splits.
        Costs ×3-4 on NumPy (see the README for what is promised).
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
    """
    be, plan, mask, bias, scales = _resolve(q, k, v, scale=scale, dropout_p=dropout_p, seed=seed, mask=mask,
                                            bias=bias, is_causal=is_causal, q_chunk_size=q_chunk_size,
                                            kv_chunk_size=kv_chunk_size, memory_budget=memory_budget, workers=workers,
                                            return_lse=return_lse, batch_invariant=batch_invariant,
                                            k_scale=k_scale, v_scale=v_scale, q_seq_lengths=q_seq_lengths,
                                            kv_seq_lengths=kv_seq_lengths, local_window_size=local_window_size,
                                            softcap=softcap)
    if any(s is not None for s in scales):
        _check_quantized_call(be, q, k, v)
        return run_attention(q, k, v, be=be, plan=plan, mask=mask, bias=bias, scales=scales)
    if be.needs_grad(q, k, v):
        return _with_gradient(be, q, k, v, plan=plan, mask=mask, bias=bias)
    return run_attention(q, k, v, be=be, plan=plan, mask=mask, bias=bias)


def _check_quantized_call(be: Any, q: Any, k: Any, v: Any) -> None:
    """What quantized keys or values cannot be combined with (yet)."""
    if be.needs_grad(q, k, v):
        msg = ("k_scale/v_scale: quantized keys or values take no gradients; run without gradients "
               "(torch.no_grad(); on JAX outside jax.grad and jax.jit, whose traced arrays may carry them), or pass "
               "dequantized k and v")
        raise TypeError(msg)
    if be.lazy_blocks:
        msg = f"k_scale/v_scale do not take {be.name} arrays yet; pass in-memory arrays, or dequantized k and v"
        raise TypeError(msg)


def _with_gradient(be: Any, q: Any, k: Any, v: Any, *, plan: Any, mask: Any, bias: Any) -> Any:
    """The forward as one node of the library's autograd, whose backward is ``attend_backward``. Mask and bias
    are inputs of the node without gradients, not constants it closes over: under an outer ``jax.jit`` they are
    tracers, which a ``jax.custom_vjp`` cannot capture (jax-ml/jax#2912)."""
    def forward(q: Any, k: Any, v: Any, mask: Any, bias: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        out, lse = attend(q, k, v, be=be, plan=dataclasses.replace(plan, with_lse=True), mask=mask, bias=bias)
        return ((out, lse) if plan.with_lse else (out,)), (q, k, v, out, lse, mask, bias)

    def backward(saved: tuple[Any, ...], d_out: Any) -> tuple[Any, ...]:
        q, k, v, out, lse, mask, bias = saved
        return (*attend_backward(q, k, v, out, lse, d_out, be=be, plan=plan, mask=mask, bias=bias), None, None)

    return be.differentiable(forward, backward, (q, k, v, mask, bias))


@keyword_hints
def scaled_dot_product_attention_vjp(
    q: Any,
    k: Any,
    v: Any,
    d_out: Any,
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
    q_seq_lengths: Any = None,
    kv_seq_lengths: Any = None,
    local_window_size: int | tuple[int, int] | None = None,
    softcap: float | None = None,
) -> tuple[Any, Any, Any]:
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
    """
    if check_probability(dropout_p, "dropout_p") > 0 and seed is None:
        msg = "seed is required with dropout_p > 0: the backward must drop what the forward dropped, got seed=None"
        raise ValueError(msg)
    be, plan, mask, bias, _ = _resolve(q, k, v, scale=scale, dropout_p=dropout_p, seed=seed, mask=mask, bias=bias,
                                       is_causal=is_causal, q_chunk_size=q_chunk_size, kv_chunk_size=kv_chunk_size,
                                       memory_budget=memory_budget, workers=workers, return_lse=True,
                                       batch_invariant=False, budget_divisor=2,  # three tiles live per step, not two
                                       q_seq_lengths=q_seq_lengths, kv_seq_lengths=kv_seq_lengths,
                                       local_window_size=local_window_size, softcap=softcap)
    check_array(d_out, "d_out")
    backend_of(q, d_out, names=("q", "d_out"))
    B, T, N, _ = q.shape
    check_shape_and_dtype(d_out, "d_out", (B, T, N, v.shape[3]), legend="[batch, q_len, heads, d_v]", dtype=q.dtype,
                          be=be)
    if be.lazy_blocks:
        msg = f"scaled_dot_product_attention_vjp does not take {be.name} arrays yet; compute them into blocks first"
        raise TypeError(msg)
    out, lse = attend(q, k, v, be=be, plan=plan, mask=mask, bias=bias)
    return attend_backward(q, k, v, out, lse, d_out, be=be, plan=plan, mask=mask, bias=bias)


def _resolve(q: Any, k: Any, v: Any, *, scale: Any, dropout_p: Any, seed: Any, mask: Any, bias: Any, is_causal: Any,
             q_chunk_size: Any, kv_chunk_size: Any, memory_budget: Any, workers: Any, return_lse: Any,
             batch_invariant: Any, budget_divisor: int = 1, k_scale: Any = None, v_scale: Any = None,
             q_seq_lengths: Any = None, kv_seq_lengths: Any = None, local_window_size: Any = None,
             softcap: Any = None) -> tuple[Any, Any, Any, Any, tuple[Any, Any]]:
    """Every argument checked, and the call resolved: ``(backend, plan, mask, bias, (k_scale, v_scale))``, masks
    4-D, scales ``[B|1, 1, 1, 1]`` arrays or None."""
    for name, a in (("q", q), ("k", k), ("v", v)):
        check_array(a, name)
    scale_arrays = [None if isinstance(s, numbers.Real) else s for s in (k_scale, v_scale)]  # numbers are no library's
    be = backend_of(q, k, v, mask, bias, *scale_arrays, q_seq_lengths, kv_seq_lengths,
                    names=("q", "k", "v", "mask", "bias", "k_scale", "v_scale", "q_seq_lengths", "kv_seq_lengths"))
    check_shape_and_dtype(q, "q", (None, None, None, None), legend="[batch, q_len, heads, d_k]", be=be)
    B, T, N, H = q.shape
    check_shape_and_dtype(k, "k", (B, None, None, H), legend="[batch, kv_len, kv_heads, d_k]", dtype=False, be=be)
    S, K = k.shape[1], k.shape[2]
    check_shape_and_dtype(v, "v", (B, S, K, None), legend="[batch, kv_len, kv_heads, d_v]", dtype=False, be=be)
    scales = tuple(check_quantized(a, name, s, batch=B, dtype=q.dtype, be=be)
                   for a, name, s in ((k, "k", k_scale), (v, "v", v_scale)))
    if K == 0 or N % K:
        msg = (f"q heads must be a multiple of k/v heads: q has {N} heads, got k/v with {K}; arrays are [B, T, N, H] "
               "(from torch's [B, N, T, H]: .permute(0, 2, 1, 3))")
        raise ValueError(msg)
    scale = check_scale(scale, H)
    dropout_p = check_probability(dropout_p, "dropout_p")
    if dropout_p > 0 and seed is None:
        seed = random_seed()
    if seed is not None:
        split_seed(seed)
    # A dequantized chunk: the cast and the scaled copy of each quantized key's (or value's) K heads, in q's dtype.
    dequantized = 2 * K * be.itemsize(q.dtype) * ((k_scale is not None) * H + (v_scale is not None) * v.shape[3])
    mask = check_mask(mask, "mask", (B, T, N, S), be=be)
    bias = check_mask(bias, "bias", (B, T, N, S), be=be, dtype=q.dtype)
    plan = plan_attention(
        be=be, device=device_of(q), shape=(B, T, S, N, H, v.shape[3]), dtype=q.dtype, scale=scale,
        masked=mask is not None, biased=bias is not None, is_causal=check_bool(is_causal, "is_causal"),
        dropout_p=dropout_p, seed=seed, q_chunk_size=q_chunk_size, kv_chunk_size=kv_chunk_size,
        memory_budget=memory_budget, workers=workers, return_lse=check_bool(return_lse, "return_lse"),
        batch_invariant=check_bool(batch_invariant, "batch_invariant"), budget_divisor=budget_divisor,
        dequantized_key_bytes=dequantized,
        q_lengths=check_lengths(q_seq_lengths, "q_seq_lengths", B, T, "q_len", be=be),
        kv_lengths=check_lengths(kv_seq_lengths, "kv_seq_lengths", B, S, "kv_len", be=be),
        window=check_window(local_window_size), softcap=check_softcap(softcap),
    )
    return be, plan, mask, bias, scales


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
    parts = [xp.astype(o, lses[0].dtype) if o.dtype != lses[0].dtype else o for o in outs]
    out, lse = merge_partials(parts, lses, xp=xp)
    return (xp.astype(out, outs[0].dtype) if out.dtype != outs[0].dtype else out), lse


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
