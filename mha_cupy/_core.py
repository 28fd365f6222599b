"""The chunked attention loop with an online softmax, on validated arrays and a resolved plan.

Letters as in ``mha_cupy.attention``. The loop visits blocks of (batch rows, query rows); inside each it walks the
keys in chunks, keeping a running maximum, a running sum and a rescaled accumulator (Rabe & Staats, arXiv
2112.05682), so no score matrix larger than one tile ever exists. What a block may see (rows, allowed keys, dropout,
key chunks) is ``_blocks.Blocks``, which the backward shares.
"""

from __future__ import annotations

import math
from typing import Any

from ._backends import Backend, device_of
from ._blocks import Blocks, Scalars, block_of
from ._merge import merge_partials
from ._plan import AttentionPlan, ceil_div
from ._threads import run_blocks

__all__ = ["ChunkLoop", "attend"]


def attend(q: Any, k: Any, v: Any, *, be: Backend, plan: AttentionPlan, mask: Any = None, bias: Any = None,
           offsets: tuple[int, int, int] = (0, 0, 0), scales: tuple[Any, Any] = (None, None)) -> Any:
    """Attention of validated ``q [B,T,N,H]`` over ``k [B,S,K,H]``, ``v [B,S,K,V]`` of backend ``be`` under ``plan``.

    ``mask`` and ``bias`` are 4-D (``check_mask``). When the arrays are blocks
    of a larger problem, ``offsets`` are the block's first (batch, query, key)
    indices in it (the dropout counter, the row lengths and the causal and
    window alignment are those of the whole problem, ``plan.extent``). ``scales`` are those of quantized keys and
    values (``[B|1, 1, 1, 1]`` in q's dtype, or None: ``check_quantized``), applied chunk by chunk. Arrays are in
    memory here; lazy chunked ones are routed by ``_route``. Returns the output
    ``[B,T,N,V]``, or ``(output, lse)`` with ``plan.with_lse`` (``lse [B,T,N]``
    in the compute dtype). Blocks write their own slices (or, where arrays are
    immutable, are concatenated), and key ranges split over workers merge
    exactly by log-sum-exp, so the result does not depend on the order or the
    number of workers beyond rounding.
    """
    xp, T = be.xp, q.shape[1]
    if plan.query_tiles and T % plan.chunks.q:  # whole tiles: padded rows are computed, then dropped
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


def _run(loop: ChunkLoop) -> Any:
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
        out[blk[0]:blk[1], blk[2]:blk[3], ...] = xp.astype(res, out.dtype, copy=False)
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
    per_row = len(results) // ceil_div(B, plan.chunks.batch) if results else 0

    def join(parts: list[Any]) -> Any:
        rows = [parts[r:r + per_row] for r in range(0, len(parts), per_row)]
        return xp.concat([xp.concat(r, axis=1) if len(r) > 1 else r[0] for r in rows], axis=0)

    out = join([r for r, _ in results])
    return (out, join([lse for _, lse in results])) if plan.with_lse else out


class ChunkLoop(Blocks):
    """One attention problem as chunk loops: ``block_state`` computes a (batch, query) block's online-softmax state
    ``(m, l, acc)`` over a key range, ``normalize`` turns a state into output rows and their log-sum-exp in the
    compute dtype, ``finish`` into the output dtype."""

    def __init__(self, q: Any, k: Any, v: Any, **blocks: Any) -> None:
        super().__init__(q, k, v, **blocks)
        # Library fast paths: on JAX compiled once per shape instead of op by op.
        self.step = self.be.compile(_online_softmax_step,
                                    static_argnames=("be", "keep_scale", "fixed_order", "softcap", "width"))

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
        for s0 in self.key_chunks(s_lo, s_hi):
            bsl, tsl, ssl = slice(b0, b1), slice(t0, t1), slice(s0, min(s_hi, s0 + self.plan.chunks.kv))
            ns = ssl.stop - ssl.start
            kb, vb, allowed = self.key_chunk(bsl, tsl, ssl)
            kb, vb = xp.permute_dims(kb, (0, 2, 3, 1)), xp.permute_dims(vb, (0, 2, 1, 3))  # [b, K, H, s], [b, K, s, V]
            bias = None if self.bias is None else block_of(self.bias, bsl, tsl, ssl, (K, G), xp=xp)
            keep = self.keep(bsl, tsl, ssl)
            # The front of the tile, contiguous, so that a shorter last chunk needs no strides.
            out = None if tile is None else xp.reshape(tile[:rows * ns], (nb, K, nt * G, ns))
            m, l, acc = self.step(qb, kb, vb, m, l, acc, bias, allowed, keep, self.scalars, out,
                                  be=self.be, keep_scale=self.keep_scale, fixed_order=self.plan.batch_invariant,
                                  softcap=self.plan.softcap, width=self.plan.chunks.kv)
        return m, l, acc

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
        res = self.xp.astype(res, self.q.dtype, copy=False)
        return res, (lse if self.plan.with_lse else None)


def _online_softmax_step(qb: Any, kb: Any, vb: Any, m: Any, l: Any, acc: Any, bias: Any, allowed: Any, keep: Any,
                         scalars: Scalars, tile: Any, *, be: Backend, keep_scale: float,
                         fixed_order: bool, softcap: float | None = None, width: int = 0) -> tuple[Any, Any, Any]:
    """One key chunk of the online softmax: scores ``q k^T``, then the running max ``m [b,K,t,G,1]``, sum ``l``
    and rescaled accumulator ``acc [b,K,t*G,V]`` updated (in place where the library can).

    ``bias``, ``allowed`` and ``keep`` (dropout) are ``[b,K,t,G,s]`` blocks or None; ``scalars`` holds
    ``-inf``, 0 and 1 (``Scalars``); ``tile`` is a ``[b,K,t*G,s]`` buffer the scores
    may be written into, or None; ``fixed_order`` makes both products ``batch_invariant`` ones, and the max and
    sum of a chunk shorter than ``width`` (the grid's) run over ``width`` entries, -inf past the keys, so that a
    row's sums do not depend on where the call's keys end; ``softcap`` caps the scaled logits
    (``c * tanh(logits / c)``) before bias and masks.
    """
    xp = be.xp
    neg_inf, zero, _ = scalars
    nb, K, nt, G, _ = m.shape
    kv_chunk = kb.shape[-1]
    kb, vb = xp.astype(kb, qb.dtype, copy=False), xp.astype(vb, qb.dtype, copy=False)
    if (bias is None and keep is None and softcap is None
            and be.attend_chunk(qb, kb, vb, m, l, acc, allowed, fixed_order=fixed_order, width=width)):
        return m, l, acc
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
    padded = fixed_order and kv_chunk < width
    if padded:
        pad = xp.full((nb, K, nt, G, width - kv_chunk), -math.inf, dtype=scores.dtype, device=device_of(scores))
        scores = xp.concat([scores, pad], axis=-1)
    p, m, l, acc = be.online_softmax(scores, m, l, acc, scalars)  # every array here is this block's own
    p = p[..., :kv_chunk] if padded else p
    if keep is not None:
        p = xp.where(keep, p, zero) * keep_scale
    acc += be.matmul(xp.reshape(p, (nb, K, nt * G, kv_chunk)), vb, fixed_order=fixed_order)
    return m, l, acc
