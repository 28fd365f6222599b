"""The layer's projections for a resolved call: queries, keys and values from ``x``/``x_kv`` (or the cache), and
row-blocked products, shared by the forward (``module``) and the backward (``_layer_vjp``).

Letters as in ``mha_cupy.attention``.
"""

from __future__ import annotations

from typing import Any

from ._layer_plan import CallPlan, LayerState
from ._threads import matmul_rows

__all__ = ["rows_matmul", "project", "queries_keys_values"]


def rows_matmul(layer: LayerState, plan: CallPlan, x: Any, w: Any) -> Any:
    """``x [b, L, D] @ w [D, F]`` -> ``[b, L, F]``: one 2-D GEMM over the b L rows (a batched product runs as b small
    GEMMs in NumPy); on lazy chunked arrays a broadcast product, which keeps x's chunks."""
    xp = layer.xp
    if layer.be.lazy_blocks:
        return layer.be.matmul(x, w)
    y = matmul_rows(xp.reshape(x, (x.shape[0] * x.shape[1], x.shape[2])), w, be=layer.be,
                    workers=plan.attention.workers, fixed_order=plan.fixed_order)
    return xp.reshape(y, (x.shape[0], x.shape[1], w.shape[1]))


def project(layer: LayerState, plan: CallPlan, x: Any, w: Any, shape: tuple[int, ...]) -> Any:
    """``x [b, L, E] @ w.reshape(-1, E).T`` reshaped to ``[b, L, *shape]``, as one 2-D GEMM over the b L rows."""
    xp = layer.xp
    y = rows_matmul(layer, plan, x, xp.matrix_transpose(xp.reshape(w, (-1, layer.emsize))))
    return xp.reshape(y, (x.shape[0], x.shape[1], *shape))


def queries_keys_values(layer: LayerState, plan: CallPlan, x: Any, x_kv: Any, b0: int,
                        b1: int) -> tuple[Any, Any, Any]:
    """Queries ``[b, T, N, H]``, keys ``[b, S, kh, H]`` and values ``[b, S, kh, V]`` of batch rows ``b0:b1``."""
    N, H, V, kh, w = layer.nhead, layer.d_k, layer.d_v, plan.project_heads, layer.weights
    if plan.kv_source == "cache":
        return (project(layer, plan, x, w.query(), (N, H)), *layer.cache.keys_values(b0, b1))
    if w.w_qkv is not None and plan.kv_source == "self":
        qkv = project(layer, plan, x, w.w_qkv, (3, N, H))
        return qkv[:, :, 0, ...], qkv[:, :, 1, ...], qkv[:, :, 2, ...]
    q = project(layer, plan, x, w.query(), (N, H))
    src = x if x_kv is None else x_kv
    w_kv, w_k, w_v = w.key_value(kh)
    if w_kv is not None:
        kv = project(layer, plan, src, w_kv, (2, kh, H))
        return q, kv[:, :, 0, ...], kv[:, :, 1, ...]
    return q, project(layer, plan, src, w_k, (kh, H)), project(layer, plan, src, w_v, (kh, V))
