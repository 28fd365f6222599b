"""Every attention computation routed in one place, forward and backward, for the public functions and the layer:
what a call cannot do is refused first, then a call runs as Dask's block graph (``_dask_graph``), as one node of
its library's autograd (the backward is ``_backward``), as one whole JAX program, or as the eager chunk loop
(``_core``). Lazy libraries are decided here, at the entry (array-api-extra's ``lazy_apply`` pattern).

Letters as in ``mha_cupy.attention``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ._backends import Backend
from ._backward import attend_backward
from ._core import attend
from ._dask_graph import attend_blocks
from ._plan import AttentionPlan

__all__ = ["STATIC", "compiles_whole", "forward", "refuse", "vjp"]

#: ``attend``'s arguments that are not arrays: a compiled ``attend`` is specialised to them.
STATIC = ("be", "plan", "offsets")


def refuse(be: Backend, *, quantized: bool = False, gradient: bool = False, vjp_of: str | None = None) -> None:
    """What no route takes (yet): quantized keys or values with gradients or on lazy arrays, a vjp (``vjp_of``: the
    function's name) on lazy arrays."""
    if quantized and gradient:
        msg = ("k_scale/v_scale: quantized keys or values take no gradients; run without gradients "
               "(torch.no_grad(); on JAX outside jax.grad and jax.jit, whose traced arrays may carry them), or pass "
               "dequantized k and v")
        raise TypeError(msg)
    if quantized and be.lazy_blocks:
        msg = f"k_scale/v_scale do not take {be.name} arrays yet; pass in-memory arrays, or dequantized k and v"
        raise TypeError(msg)
    if vjp_of is not None and be.lazy_blocks:
        msg = f"{vjp_of} does not take {be.name} arrays yet; compute them into blocks first"
        raise TypeError(msg)


def forward(q: Any, k: Any, v: Any, *, be: Backend, plan: AttentionPlan, mask: Any = None, bias: Any = None,
            scales: tuple[Any, Any] = (None, None), offsets: tuple[int, int, int] = (0, 0, 0),
            gradient: bool | None = None, backward_plan: Callable[[], AttentionPlan] | None = None) -> Any:
    """The output (``(out, lse)`` with ``plan.with_lse``) of checked arrays under ``plan``. ``gradient``: join the
    library's autograd (None: when it would see the arrays, ``Backend.needs_grad``; the layer passes False, being
    one node itself), whose backward follows the plan ``backward_plan()`` makes when it runs (default ``plan``).
    ``offsets``: the arrays' first (batch, query, key) indices in the whole problem."""
    quantized = any(s is not None for s in scales)
    gradient = be.needs_grad(q, k, v) if gradient is None else gradient
    refuse(be, quantized=quantized, gradient=gradient)
    if be.lazy_blocks:
        return attend_blocks(q, k, v, be=be, plan=plan, mask=mask, bias=bias, offsets=offsets)
    if gradient:
        return _with_gradient(be, q, k, v, plan=plan, mask=mask, bias=bias,
                              backward_plan=backward_plan or (lambda: plan))
    if not compiles_whole(plan, (q.shape[0], q.shape[1], k.shape[1])):
        return attend(q, k, v, be=be, plan=plan, mask=mask, bias=bias, offsets=offsets, scales=scales)
    # The batch offset only counts for dropout and row lengths, which such plans lack: one program serves every
    # part of a call split by save_peak_mem_factor.
    run = be.compile(attend, static_argnames=STATIC)
    return run(q, k, v, be=be, plan=plan, mask=mask, bias=bias, offsets=(0, *offsets[1:]), scales=scales)


def vjp(q: Any, k: Any, v: Any, d_out: Any, *, be: Backend, plan: AttentionPlan, mask: Any = None, bias: Any = None,
        scales: tuple[Any, Any] = (None, None), vjp_of: str) -> tuple[Any, tuple[Any, Any, Any]]:
    """The forward's output and the gradients ``(dq, dk, dv)`` of ``sum(out * d_out)`` (``vjp_of``: the public
    function, for messages). Quantized keys and values (``scales``) are constants here."""
    refuse(be, vjp_of=vjp_of)
    plan = dataclasses.replace(plan, with_lse=True)
    out, lse = attend(q, k, v, be=be, plan=plan, mask=mask, bias=bias, scales=scales)
    return out, attend_backward(q, k, v, out, lse, d_out, be=be, plan=plan, mask=mask, bias=bias, scales=scales)


def compiles_whole(plan: AttentionPlan, sizes: tuple[int, int, int]) -> bool:
    """Whether a library that compiles (JAX) should compile all of ``attend`` as one program, once per shape, rather
    than step by step, for a problem of ``sizes`` ``(B, T, S)``: only when the plan is one tile, since XLA keeps
    the score tiles of a compiled loop alive together (1.9 GiB at T = S = 8192, against 0.14 GiB step by step),
    and not when the plan carries values that change from call to call (a dropout seed, per-row lengths), which
    would compile again on every call."""
    B, T, S = sizes
    one_tile = plan.chunks.batch >= B and plan.chunks.q >= T and plan.chunks.kv >= S
    return one_tile and plan.dropout_key is None and plan.q_lengths is None and plan.kv_lengths is None


def _with_gradient(be: Backend, q: Any, k: Any, v: Any, *, plan: AttentionPlan, mask: Any, bias: Any,
                   backward_plan: Callable[[], AttentionPlan]) -> Any:
    """The forward as one node of the library's autograd, whose backward is ``attend_backward``. Mask and bias
    are inputs of the node without gradients, not constants it closes over: under an outer ``jax.jit`` they are
    tracers, which a ``jax.custom_vjp`` cannot capture (jax-ml/jax#2912)."""
    def node_forward(q: Any, k: Any, v: Any, mask: Any, bias: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        out, lse = attend(q, k, v, be=be, plan=dataclasses.replace(plan, with_lse=True), mask=mask, bias=bias)
        return ((out, lse) if plan.with_lse else (out,)), (q, k, v, out, lse, mask, bias)

    def node_backward(saved: tuple[Any, ...], d_out: Any) -> tuple[Any, ...]:
        q, k, v, out, lse, mask, bias = saved
        grads = attend_backward(q, k, v, out, lse, d_out, be=be, plan=backward_plan(), mask=mask, bias=bias)
        return (*grads, None, None)

    return be.differentiable(node_forward, node_backward, (q, k, v, mask, bias))
