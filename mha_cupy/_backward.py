"""The backward pass of attention (FlashAttention-2's), as explicit chunk loops in the Array API.

Letters as in ``mha_cupy.attention``. Given the forward's output ``O`` and log-sum-exp ``L``
and the output gradient ``dO``, each (batch, query) block recomputes its
scores tile by tile, ``P = exp(scale q k^T + bias - L)`` (0 where masked), and
with ``D = rowsum(dO * O)`` and the dropout factor ``Z`` (keep / (1 - p), or 1):

    dV += (P Z)^T dO,   dP = (dO V^T) Z,   dS = P (dP - D) (times 1 - (capped / c)^2 with softcap c),
    dQ += scale dS K,   dK += scale dS^T Q.

No score matrix larger than one tile exists; grouped heads are folded into GEMM
rows as in the forward, so dK and dV sum over each group inside the products.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import array_api_extra as xpx

from ._backends import Backend
from ._blocks import Blocks, block_of
from ._merge import safe_max
from ._plan import AttentionPlan
from ._threads import run_blocks

__all__ = ["attend_backward"]


def attend_backward(q: Any, k: Any, v: Any, out: Any, lse: Any, d_out: Any, *, be: Backend, plan: AttentionPlan,
                    mask: Any = None, bias: Any = None, scales: tuple[Any, Any] = (None, None)) -> tuple[Any, Any, Any]:
    """Gradients ``(dq, dk, dv)`` of ``sum(out * d_out)`` for validated arrays and the forward's ``plan``.

    ``out [B,T,N,V]`` and ``lse [B,T,N]`` are the forward's (``plan.with_lse``); ``d_out`` has ``out``'s shape.
    The gradients have the inputs' shapes and q's dtype (with quantized keys and values, ``scales``: the
    gradients with respect to what they stand for).
    """
    xp = be.xp
    core = Blocks(q, k, v, be=be, plan=plan, mask=mask, bias=bias, scales=scales)
    cdt = core.cdt
    B, T, N, H = q.shape
    S, K, V = k.shape[1], k.shape[2], v.shape[3]
    dk = xp.zeros((B, S, K, H), dtype=cdt, device=core.dev)
    dv = xp.zeros((B, S, K, V), dtype=cdt, device=core.dev)
    # FlashAttention-2's split: each worker owns a key range, so its dk, dv rows are its own; the query
    # gradients of the ranges are summed afterwards, in range order (the same bits on every run).
    workers = plan.workers if be.item_assignment else 1
    ranges = dataclasses.replace(plan, key_splits=max(1, workers)).key_ranges(0, S)
    dqs: list[Any] = [None] * len(ranges)

    def key_range(i: int, s_lo: int, s_hi: int) -> None:
        nonlocal dk, dv
        dq = xp.zeros((B, T, N, H), dtype=cdt, device=core.dev)
        for b0, b1, t0, t1 in plan.blocks(B, T):
            dq_blk, dk, dv = _block(core, out, lse, d_out, dk, dv, b0, b1, t0, t1, s_lo, s_hi)
            dq = xpx.at(dq, (slice(b0, b1), slice(t0, t1), Ellipsis)).set(dq_blk)
        dqs[i] = dq

    run_blocks(key_range, [(i, *r) for i, r in enumerate(ranges)], workers, be)
    dq = dqs[0]
    for part in dqs[1:]:
        dq = dq + part
    return tuple(xp.astype(g, q.dtype, copy=False) for g in (dq, dk, dv))


def _block(core: Blocks, out: Any, lse: Any, d_out: Any, dk: Any, dv: Any, b0: int, b1: int, t0: int, t1: int,
           s_lo: int, s_hi: int) -> tuple[Any, Any, Any]:
    """One (batch, query) block over keys ``[s_lo, s_hi)``: its dq rows ``[b, t, N, H]``, and dk, dv with its
    contributions added (in place where arrays are writable)."""
    xp, plan = core.xp, core.plan
    qs, do, l_row = (core.fold(a, b0, b1, t0, t1) for a in (core.q, d_out, lse))  # [b,K,t*G,H|V|1]
    qs = qs * plan.scale
    if core.limited or core.mask is not None:  # rows that see no key (padding, masked out) weigh 0 in dK and dV,
        dead = l_row == core.scalars.neg_inf  # and 0 * NaN would poison them (jax-ml/jax#26328): zero those rows
        qs, do = (xp.where(dead, core.scalars.zero, a) for a in (qs, do))
    d_row = xp.sum(do * core.fold(out, b0, b1, t0, t1), axis=-1, keepdims=True)  # D = rowsum(dO * O)
    rows = _Rows(qs, do, safe_max(l_row, xp=xp), d_row)  # rows with no visible key: P is 0 there
    dq = xp.zeros(qs.shape, dtype=core.cdt, device=core.dev)
    lo, hi = core.key_span(b0, b1, t0, t1)
    s_end = min(s_hi, hi)
    for s0 in core.key_chunks(max(s_lo, lo), s_end):  # both on the chunk grid
        bsl, ssl = slice(b0, b1), slice(s0, min(s_end, s0 + plan.chunks.kv))
        dq_part, dk_blk, dv_blk = _chunk(core, rows, bsl, slice(t0, t1), ssl)
        dq = dq + dq_part
        dk = xpx.at(dk, (bsl, ssl, Ellipsis)).add(xp.permute_dims(dk_blk, (0, 2, 1, 3)))
        dv = xpx.at(dv, (bsl, ssl, Ellipsis)).add(xp.permute_dims(dv_blk, (0, 2, 1, 3)))
    return core.unfold(dq * plan.scale, t1 - t0), dk, dv


class _Rows(NamedTuple):
    """A block's rows in the GEMM layout: scaled queries, dO, log-sum-exp and ``D = rowsum(dO * O)``."""

    qs: Any
    do: Any
    l_row: Any
    d_row: Any


def _chunk(core: Blocks, rows: _Rows, bsl: slice, tsl: slice, ssl: slice) -> tuple[Any, Any, Any]:
    """One key chunk of a block: its terms of dq ``[b, K, t*G, H]``, dk ``[b, K, s, H]`` and dv ``[b, K, s, V]``.
    A function of its own so that its score tiles are freed when it returns, before the next chunk's exist."""
    xp, cdt, (nb, K, ntg, _) = core.xp, core.cdt, rows.qs.shape
    kb, vb, allowed = core.key_chunk(bsl, tsl, ssl)  # hidden keys zeroed: 0 * NaN would poison the gradients
    kb = xp.astype(xp.permute_dims(kb, (0, 2, 1, 3)), cdt, copy=False)  # [b, K, s, H]
    vb = xp.astype(xp.permute_dims(vb, (0, 2, 1, 3)), cdt, copy=False)  # [b, K, s, V]
    p, capped = _probabilities(core, rows.qs, kb, rows.l_row, allowed, bsl, tsl, ssl)  # [b, K, t*G, s]
    z, keep = None, core.keep(bsl, tsl, ssl)
    if keep is not None:
        keep = xp.reshape(keep, (nb, K, ntg, ssl.stop - ssl.start))
        z = xp.where(keep, xp.asarray(core.keep_scale, dtype=cdt, device=core.dev), core.scalars.zero)
    dv_blk = core.be.matmul(xp.matrix_transpose(p if z is None else p * z), rows.do)  # [b, K, s, V]
    dp = core.be.matmul(rows.do, xp.matrix_transpose(vb))
    if z is not None:
        dp = dp * z
    ds = p * (dp - rows.d_row)
    del p, dp
    if capped is not None:  # through c * tanh(x / c): times 1 - tanh(x / c)^2
        ds = ds * (core.scalars.one - (capped / core.plan.softcap) ** 2)
    return core.be.matmul(ds, kb), core.be.matmul(xp.matrix_transpose(ds), rows.qs), dv_blk  # qs carries the scale


def _probabilities(core: Blocks, qs: Any, kb: Any, l_row: Any, allowed: Any, bsl: slice, tsl: slice,
                   ssl: slice) -> tuple[Any, Any]:
    """``exp(scores - L)`` of one tile ``[b, K, t*G, s]``, 0 where ``allowed`` (or None: all) hides a key; and the
    soft-capped logits (None without ``softcap``)."""
    xp, K, G, softcap = core.xp, core.K, core.G, core.plan.softcap
    nb, nt, ns = bsl.stop - bsl.start, tsl.stop - tsl.start, ssl.stop - ssl.start
    scores = core.be.matmul(qs, xp.matrix_transpose(kb))
    capped = None
    if softcap is not None:
        scores = capped = xp.tanh(scores / softcap) * softcap
    if core.bias is not None or allowed is not None:
        scores = xp.reshape(scores, (nb, K, nt, G, ns))
        if core.bias is not None:
            scores = scores + xp.astype(block_of(core.bias, bsl, tsl, ssl, (K, G), xp=xp), core.cdt, copy=False)
        if allowed is not None:
            scores = xp.where(allowed, scores, core.scalars.neg_inf)
        scores = xp.reshape(scores, (nb, K, nt * G, ns))
    return xp.exp(scores - l_row), capped
