"""Attention of Dask arrays as a block graph (routed here by ``_route``, so that the loops know nothing of Dask):
one task per (batch, query, key) block of chunks, merged by log-sum-exp.
Letters as in ``mha_cupy.attention``. Each task runs the ordinary chunk loop (``_core.attend``)
on its blocks, in the blocks' own library (NumPy or CuPy), with the block's
global offsets, so dropout masks and the causal alignment are those of the whole
problem. A block's result is its output and log-sum-exp packed in one array
``[b, t, N, V + 1]`` (compute dtype); the key blocks of one (batch, query) block
are merged pairwise in a tree (``_merge_packed``, ``_merge.merge_partials``).
Tasks: ``nb * nt * (2 * ns - 1)`` plus one or two per output block.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import array_api_compat

from ._backends import Backend, resolve_backend
from ._core import attend
from ._merge import merge_partials
from ._plan import AttentionPlan

__all__ = ["attend_blocks", "check_chunks"]


def _starts(chunks: tuple[int, ...]) -> list[int]:
    return [0, *itertools.accumulate(chunks)][:-1]


def check_chunks(q: Any, k: Any, v: Any, mask: Any, bias: Any) -> None:
    """Refuse chunkings the block tasks cannot take, naming the rechunk that fixes each."""
    for name, a in (("q", q), ("k", k), ("v", v), ("mask", mask), ("bias", bias)):
        if a is not None and any(math.isnan(c) for axis in a.chunks for c in axis):
            msg = f"{name} must have known chunk sizes, got {a.chunks}; call {name}.compute_chunk_sizes() first"
            raise ValueError(msg)
    for name, a in (("q", q), ("k", k), ("v", v)):
        for axis, what in ((2, "heads"), (3, "head size")):
            if len(a.chunks[axis]) > 1:
                msg = (f"{name} must have one chunk along its {what} (axis {axis}), got chunks {a.chunks[axis]}; "
                       f"rechunk with {name}.rechunk({{{axis}: -1}})")
                raise ValueError(msg)
    for name, a in (("k", k), ("v", v)):
        if a.chunks[0] != q.chunks[0]:
            msg = (f"{name} must be chunked along the batch like q, got {a.chunks[0]} and q's {q.chunks[0]}; "
                   f"rechunk with {name}.rechunk({{0: q.chunks[0]}})")
            raise ValueError(msg)
    if v.chunks[1] != k.chunks[1]:
        msg = (f"v must be chunked along the keys like k, got {v.chunks[1]} and k's {k.chunks[1]}; rechunk with "
               "v.rechunk({1: k.chunks[1]})")
        raise ValueError(msg)
    for name, a in (("mask", mask), ("bias", bias)):
        if a is not None:
            _check_broadcast_chunks(name, a, (q.chunks[0], q.chunks[1], None, k.chunks[1]))


def _check_broadcast_chunks(name: str, a: Any, like: tuple[Any, ...]) -> None:
    for axis, want in enumerate(like):
        if a.shape[axis] == 1:
            continue
        expected = (a.shape[axis],) if want is None else want
        if a.chunks[axis] != expected:
            msg = (f"{name} must be chunked along axis {axis} as {expected} (like q and k, or one chunk for heads), "
                   f"got {a.chunks[axis]}; rechunk with {name}.rechunk({{{axis}: {expected}}})")
            raise ValueError(msg)


def attend_blocks(q: Any, k: Any, v: Any, *, be: Backend, plan: AttentionPlan, mask: Any, bias: Any,
                   offsets: tuple[int, int, int]) -> Any:
    """``_core.attend`` for Dask arrays: a lazy ``[B, T, N, V]`` output (and ``lse [B, T, N]`` with
    ``plan.with_lse``)."""
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    check_chunks(q, k, v, mask, bias)
    block_plan = dataclasses.replace(plan, with_lse=True, key_splits=1)
    token = tokenize(q, k, v, mask, bias, block_plan, offsets)
    part, merge, out_name, lse_name = (f"mha-{w}-{token}" for w in ("partial", "merge", "out", "lse"))
    dsk: dict[Any, Any] = {}
    b_starts, t_starts, s_starts = _starts(q.chunks[0]), _starts(q.chunks[1]), _starts(k.chunks[1])
    for (i, b0), (j, t0) in itertools.product(enumerate(b_starts), enumerate(t_starts)):
        keys = []
        for s, s0 in enumerate(s_starts):
            key = (part, i, j, s)
            dsk[key] = (_partial_task, (q.name, i, j, 0, 0), (k.name, i, s, 0, 0), (v.name, i, s, 0, 0),
                        _block_key(mask, i, j, s), _block_key(bias, i, j, s), block_plan,
                        (offsets[0] + b0, offsets[1] + t0, offsets[2] + s0))
            keys.append(key)
        final = _tree(dsk, keys, (merge, i, j))
        dsk[(out_name, i, j, 0, 0)] = (_unpack_out, final, str(q.dtype))
        if plan.with_lse:
            dsk[(lse_name, i, j, 0)] = (_unpack_lse, final)
    deps = [a for a in (q, k, v, mask, bias) if a is not None]
    graph = HighLevelGraph.from_collections(out_name, dsk, dependencies=deps)
    blocks_xp = be.meta_namespace(q)  # the blocks' library (NumPy or CuPy)
    out = da.Array(graph, out_name, chunks=(q.chunks[0], q.chunks[1], (q.shape[2],), (v.shape[3],)),
                   meta=blocks_xp.empty((0, 0, 0, 0), dtype=q.dtype))
    if not plan.with_lse:
        return out
    cdt = resolve_backend(blocks_xp).compute_dtype(q.dtype)
    lse = da.Array(graph, lse_name, chunks=(q.chunks[0], q.chunks[1], (q.shape[2],)),
                   meta=blocks_xp.empty((0, 0, 0), dtype=cdt))
    return out, lse


def _block_key(a: Any, i: int, j: int, s: int) -> Any:
    if a is None:
        return None
    idx = tuple(0 if a.shape[axis] == 1 else n for axis, n in enumerate((i, j, 0, s)))
    return (a.name, *idx)


def _tree(dsk: dict[Any, Any], keys: list[Any], prefix: tuple[Any, ...]) -> Any:
    """Merge ``keys`` pairwise, level by level, in key order; the key of the last merge (or the only key)."""
    level = 0
    while len(keys) > 1:
        merged = []
        for n in range(0, len(keys) - 1, 2):
            key = (*prefix, level, n // 2)
            dsk[key] = (_merge_packed, keys[n], keys[n + 1])
            merged.append(key)
        if len(keys) % 2:
            merged.append(keys[-1])
        keys, level = merged, level + 1
    return keys[0]


def _partial_task(q: Any, k: Any, v: Any, mask: Any, bias: Any, plan: AttentionPlan,
                  offsets: tuple[int, int, int]) -> Any:
    """One block: the chunk loop in the blocks' library; output and log-sum-exp packed in the compute dtype."""
    be = resolve_backend(array_api_compat.array_namespace(q))
    with be.parallel_section():  # Dask runs tasks side by side: BLAS stays on one thread in each
        out, lse = attend(q, k, v, be=be, plan=plan, mask=mask, bias=bias, offsets=offsets)
    return be.xp.concat([be.xp.astype(out, lse.dtype), lse[..., None]], axis=3)


def _merge_packed(a: Any, b: Any) -> Any:
    """Two key ranges' packed results as one."""
    xp = array_api_compat.array_namespace(a)
    out, lse = merge_partials([a[..., :-1], b[..., :-1]], [a[..., -1], b[..., -1]], xp=xp)
    return xp.concat([out, lse[..., None]], axis=3)


def _unpack_out(packed: Any, dtype: str) -> Any:
    xp = array_api_compat.array_namespace(packed)
    out = packed[..., :-1]
    return xp.astype(out, getattr(xp, dtype), copy=False)


def _unpack_lse(packed: Any) -> Any:
    return packed[..., -1]
