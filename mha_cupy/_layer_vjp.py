"""The layer's backward pass: gradients of ``sum(layer(x, x_kv) * d_out)`` for inputs and weights.

Letters as in ``mha_cupy.attention`` (``kh`` of the K kv heads projected: K, or 1 with
``reuse_first_head_kv``). With the forward's projections
``q = x Wq``, ``k = src Wk``, ``v = src Wv``, heads ``O`` and ``y = O Wout``:

    dO = dy Wout^T,  dWout = O^T dy,  (dq, dk, dv) = attention backward,
    dx += dq Wq,  dsrc += dk Wk + dv Wv,  dWq = dq^T x,  dWk = dk^T src,  dWv = dv^T src.

Every product is a 2-D GEMM over flattened rows; cached keys/values are constants.
"""

from __future__ import annotations

import math
from typing import Any

from . import _route
from ._layer_plan import CallPlan, LayerState
from ._projections import queries_keys_values, rows_matmul

__all__ = ["differentiable_call", "layer_vjp"]


def layer_vjp(layer: LayerState, plan: CallPlan, x: Any, x_kv: Any, d_out: Any) -> tuple[Any, Any, dict]:
    """``(dx, dx_kv, grads)`` for a resolved call (one that writes neither ``x`` nor the cache). Dropout uses the
    plan's mask; the layer's call counter is the caller's business."""
    xp, E, B, T = layer.xp, layer.emsize, plan.batch, plan.q_len
    x3 = xp.reshape(x, (B, T, E))
    kv3 = xp.reshape(x_kv, (B, plan.kv_len, E)) if plan.kv_source == "cross" else None
    dy = xp.reshape(d_out, (B, T, E))
    q, k, v = queries_keys_values(layer, plan, x3, kv3, 0, B)
    scales = layer.cache.scales_of(0, B) if plan.kv_source == "cache" else (None, None)  # quantized: constants
    N, V, H = layer.nhead, layer.d_v, layer.d_k
    w_out = xp.reshape(layer.weights.w_out, (N * V, E))
    d_heads = xp.reshape(rows_matmul(layer, plan, dy, xp.matrix_transpose(w_out)), (B, T, N, V))
    heads, (dq, dk, dv) = _route.vjp(q, k, v, d_heads, be=layer.be, plan=plan.attention, scales=scales,
                                     vjp_of="MultiHeadAttention.vjp")
    grads = {"w_out": xp.reshape(_weight_grad(heads, dy, be=layer.be), (N, V, E))}
    w_q, d_wq = _q_weight(layer), _weight_grad(dq, x3, be=layer.be)
    dx = rows_matmul(layer, plan, xp.reshape(dq, (B, T, N * H)), w_q)
    d_src, d_wk, d_wv = _kv_grads(layer, plan, x3 if kv3 is None else kv3, dk, dv)
    if plan.kv_source == "self":
        dx = dx + d_src
    if plan.add_input:
        dx = dx + dy
    grads.update(_in_layout(layer, plan, d_wq, d_wk, d_wv))
    dx_kv = None if plan.kv_source != "cross" else xp.reshape(d_src, x_kv.shape)
    return xp.reshape(dx, x.shape), dx_kv, grads


def differentiable_call(layer: LayerState, plan: CallPlan, x: Any, x_kv: Any, run: Any) -> Any:
    """``run(x, x_kv)`` (the layer's forward of a resolved call) as one node of the library's autograd (torch,
    JAX), whose backward is ``layer_vjp``; its inputs are x, x_kv and the weights."""
    if plan.cache_mode is not None or plan.write_into_x:
        msg = ("gradients do not flow through calls that write the cache or x: cache_kv and allow_inplace must "
               "be False when inputs or weights require grad (cache under torch.no_grad())")
        raise ValueError(msg)
    weights = layer.weights.present()
    n_in = 1 if x_kv is None else 2

    def forward(*inputs: Any) -> tuple[tuple[Any], tuple[Any, ...]]:
        return (run(inputs[0], inputs[1] if n_in == 2 else None),), inputs[:n_in]

    def backward(saved: tuple[Any, ...], d_out: Any) -> tuple[Any, ...]:
        dx, dx_kv, grads = layer_vjp(layer, plan, saved[0], saved[1] if n_in == 2 else None, d_out)
        return (dx, *((dx_kv,) if n_in == 2 else ()), *(grads[n] for n in weights))

    return layer.be.differentiable(forward, backward, (x, *((x_kv,) if n_in == 2 else ()), *weights.values()))


def _weight_grad(grad: Any, src: Any, *, be: Any) -> Any:
    """``grad^T @ src`` over all rows: ``[F, E]`` for ``grad [..., F]`` and ``src [..., E]`` with the same rows."""
    xp = be.xp
    rows, features = math.prod(src.shape[:-1]), math.prod(grad.shape[src.ndim - 1:])  # no -1: rows may be 0
    return be.matmul(xp.matrix_transpose(xp.reshape(grad, (rows, features))), xp.reshape(src, (rows, src.shape[-1])))


def _q_weight(layer: LayerState) -> Any:
    """The query projection as ``[N H, E]``."""
    return layer.xp.reshape(layer.weights.query(), (layer.nhead * layer.d_k, layer.emsize))


def _kv_weights(layer: LayerState, kh: int) -> tuple[Any, Any]:
    """The key and value projections of the first ``kh`` kv heads as ``[kh H, E]`` and ``[kh V, E]``."""
    xp, E = layer.xp, layer.emsize
    w_kv, w_k, w_v = layer.weights.key_value(kh)
    if w_kv is not None:
        w_k, w_v = w_kv[0, ...], w_kv[1, ...]
    return xp.reshape(w_k, (-1, E)), xp.reshape(w_v, (-1, E))


def _kv_grads(layer: LayerState, plan: CallPlan, src: Any, dk: Any, dv: Any) -> tuple[Any, Any, Any]:
    """The source's gradient ``[B, S, E]`` and the projected heads' weight gradients (None from the cache)."""
    if plan.kv_source == "cache":
        return None, None, None
    xp, B, S = layer.xp, src.shape[0], src.shape[1]
    w_k, w_v = _kv_weights(layer, plan.project_heads)
    dk3, dv3 = (xp.reshape(g, (B, S, math.prod(g.shape[2:]))) for g in (dk, dv))
    d_src = rows_matmul(layer, plan, dk3, w_k) + rows_matmul(layer, plan, dv3, w_v)
    return d_src, _weight_grad(dk3, src, be=layer.be), _weight_grad(dv3, src, be=layer.be)


def _in_layout(layer: LayerState, plan: CallPlan, d_wq: Any, d_wk: Any, d_wv: Any) -> dict[str, Any]:
    """Gradients of the layer's own weight arrays (``w_qkv``, ``w_q``, ``w_kv``, ``w_k``, ``w_v``), zeros for
    kv heads this call did not project."""
    xp, w, N, K, H, V, E = layer.xp, layer.weights, layer.nhead, layer.nhead_kv, layer.d_k, layer.d_v, layer.emsize
    kh = plan.project_heads

    def heads(g: Any, d: int) -> Any:  # [K, d, E], zero-padded past the projected heads
        zeros = xp.zeros((K, d, E), dtype=layer.dtype, device=layer.device)
        if g is None:
            return zeros
        g = xp.reshape(g, (kh, d, E))
        return g if kh == K else xp.concat([g, zeros[kh:, ...]], axis=0)

    gq = xp.reshape(d_wq, (1, N, H, E))
    if w.w_qkv is not None:
        return {"w_qkv": xp.concat([gq, heads(d_wk, H)[None, ...], heads(d_wv, V)[None, ...]], axis=0)}
    out = {"w_q": gq}
    if w.w_kv is not None:
        out["w_kv"] = xp.stack([heads(d_wk, H), heads(d_wv, V)], axis=0)
    elif w.w_k is not None:
        out["w_k"], out["w_v"] = heads(d_wk, H), heads(d_wv, V)
    return out
