"""One attention call, described once and checked once (xformers' ``fmha.Inputs`` and ``validate_inputs``).

``AttentionCall`` holds what a caller of ``scaled_dot_product_attention`` (or its vjp) passes: the arrays and
every option with its default, written here alone; the public signatures are generated from it. ``check_call``
checks every argument of a call, before anything runs, and resolves it into a ``Checked`` call: its arrays
(masks 4-D, quantization scales as arrays) and its ``_plan.Problem``. The layer, whose arrays do not exist when
it plans, resolves its options with ``check_options`` alone.

Letters as in ``mha_cupy.attention``.
"""

from __future__ import annotations

import inspect
import numbers
from dataclasses import dataclass, fields
from typing import Any

from ._backends import Backend, backend_of, device_of
from ._budget import resolve_memory_budget
from ._plan import Problem, Sizes, dequantized_key_bytes
from ._random import random_seed
from ._validation import (check_array, check_bool, check_keywords, check_lengths, check_mask,
                          check_optional_positive_int, check_positive_int, check_probability, check_quantized,
                          check_scale, check_seed, check_shape_and_dtype, check_softcap, check_window)

__all__ = ["AttentionCall", "Checked", "VJP_EXCLUDED", "check_call", "check_options", "signature"]


@dataclass(frozen=True)
class AttentionCall:
    """The arguments of one attention call as given (see ``scaled_dot_product_attention`` for each)."""

    q: Any
    k: Any
    v: Any
    scale: float | None = None
    dropout_p: float = 0.0
    seed: int | None = None
    mask: Any = None
    bias: Any = None
    is_causal: bool = False
    q_chunk_size: int | None = None
    kv_chunk_size: int | None = None
    memory_budget: int | str | None = None
    workers: int | None = None
    return_lse: bool = False
    batch_invariant: bool = False
    k_scale: Any = None
    v_scale: Any = None
    q_seq_lengths: Any = None
    kv_seq_lengths: Any = None
    local_window_size: int | tuple[int, int] | None = None
    softcap: float | None = None

    @classmethod
    def of(cls, q: Any, k: Any, v: Any, options: dict[str, Any], *, where: str,
           excluded: tuple[str, ...] = ()) -> AttentionCall:
        """The call of ``where`` with ``options``: an unknown (or ``excluded``) keyword is a TypeError naming it."""
        check_keywords(options, [p.name for p in _options(excluded)], where=where)
        return cls(q, k, v, **options)


#: What ``scaled_dot_product_attention_vjp`` does not take: quantized keys take no gradients, the backward
#: computes its own log-sum-exp, and its gradients are not promised bitwise batch invariant.
VJP_EXCLUDED = ("return_lse", "batch_invariant", "k_scale", "v_scale")


def _options(excluded: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    return [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
            for f in fields(AttentionCall)[3:] if f.name not in excluded]


def signature(arrays: tuple[str, ...], returns: str, excluded: tuple[str, ...] = ()) -> inspect.Signature:
    """A public function's signature: ``arrays`` positional, then ``AttentionCall``'s options, for ``help()``,
    IPython and Sphinx (the functions take ``**options``)."""
    positional = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="Any") for n in arrays]
    return inspect.Signature([*positional, *_options(excluded)], return_annotation=returns)


@dataclass(frozen=True)
class Checked:
    """A call whose every argument passed ``check_call``: its arrays as the loops read them, and its problem."""

    be: Backend
    q: Any
    k: Any
    v: Any
    #: ``[B|1, T|1, N|1, S|1]`` or None.
    mask: Any
    bias: Any
    #: Quantization scales of keys and values, ``[B|1, 1, 1, 1]`` in q's dtype, or None.
    scales: tuple[Any, Any]
    problem: Problem
    #: The output's gradient ``[B, T, N, V]`` of a vjp, or None.
    d_out: Any = None


#: ``check_call``'s ``d_out`` of a forward call (a vjp's ``d_out=None`` is an error to report).
FORWARD = object()


def check_call(call: AttentionCall, *, d_out: Any = FORWARD) -> Checked:
    """Every argument of ``call`` (and of its vjp: ``d_out``, the output's gradient) checked, the arrays first, and
    the call resolved; raises before anything runs."""
    gradient = d_out is not FORWARD
    for name, a in (("q", call.q), ("k", call.k), ("v", call.v), *((("d_out", d_out),) if gradient else ())):
        check_array(a, name)
    q, k, v = call.q, call.k, call.v
    scale_arrays = [None if isinstance(s, numbers.Real) else s for s in (call.k_scale, call.v_scale)]
    be = backend_of(q, k, v, call.mask, call.bias, *scale_arrays, call.q_seq_lengths, call.kv_seq_lengths,
                    d_out if gradient else None,
                    names=("q", "k", "v", "mask", "bias", "k_scale", "v_scale", "q_seq_lengths", "kv_seq_lengths",
                           "d_out"))
    sizes = _check_shapes(q, k, v, be=be)
    if gradient:
        check_shape_and_dtype(d_out, "d_out", (sizes.batch, sizes.q_len, sizes.heads, sizes.d_v),
                              legend="[batch, q_len, heads, d_v]", dtype=q.dtype, be=be)
    scales = tuple(check_quantized(a, name, s, batch=sizes.batch, dtype=q.dtype, be=be)
                   for a, name, s in ((k, "k", call.k_scale), (v, "v", call.v_scale)))
    full = (sizes.batch, sizes.q_len, sizes.heads, sizes.kv_len)
    mask = check_mask(call.mask, "mask", full, be=be)
    bias = check_mask(call.bias, "bias", full, be=be, dtype=q.dtype)
    dequantized = dequantized_key_bytes(sizes, be.itemsize(q.dtype), keys=call.k_scale is not None,
                                        values=call.v_scale is not None)
    problem = check_options(call, be=be, device=device_of(q), dtype=q.dtype, sizes=sizes, masked=mask is not None,
                            biased=bias is not None, dequantized_key_bytes=dequantized, backward=gradient)
    return Checked(be=be, q=q, k=k, v=v, mask=mask, bias=bias, scales=scales, problem=problem,
                   d_out=d_out if gradient else None)


def _check_shapes(q: Any, k: Any, v: Any, *, be: Backend) -> Sizes:
    check_shape_and_dtype(q, "q", (None, None, None, None), legend="[batch, q_len, heads, d_k]", be=be)
    B, T, N, H = q.shape
    check_shape_and_dtype(k, "k", (B, None, None, H), legend="[batch, kv_len, kv_heads, d_k]", dtype=False, be=be)
    S, K = k.shape[1], k.shape[2]
    check_shape_and_dtype(v, "v", (B, S, K, None), legend="[batch, kv_len, kv_heads, d_v]", dtype=False, be=be)
    if K == 0 or N % K:
        msg = (f"q heads must be a multiple of k/v heads: q has {N} heads, got k/v with {K}; arrays are [B, T, N, H] "
               "(from torch's [B, N, T, H]: .permute(0, 2, 1, 3))")
        raise ValueError(msg)
    return Sizes(B, T, S, N, K, H, v.shape[3])


def check_options(call: AttentionCall, *, be: Backend, device: Any, dtype: Any, sizes: Sizes, masked: bool = False,
                  biased: bool = False, dequantized_key_bytes: int = 0, divisor: int = 1, backward: bool = False,
                  kv_axis: str = "kv_len") -> Problem:
    """The options of ``call`` (not its arrays) checked and resolved into the ``Problem`` of ``sizes``: the scale,
    the dropout seed (drawn when dropout runs without one; a ``backward`` needs the forward's), lengths as Python
    ints, the budget in bytes."""
    dropout_p = check_probability(call.dropout_p, "dropout_p")
    seed = None if call.seed is None else check_seed(call.seed)
    if dropout_p > 0 and seed is None and backward:
        msg = "seed is required with dropout_p > 0: the backward must drop what the forward dropped, got seed=None"
        raise ValueError(msg)
    if dropout_p > 0 and seed is None:
        seed = random_seed()
    workers = call.workers
    return Problem(
        be=be, device=device, dtype=dtype, sizes=sizes, scale=check_scale(call.scale, sizes.d_k),
        workers=be.default_workers(device) if workers is None else check_positive_int(workers, "workers"),
        budget=resolve_memory_budget(call.memory_budget, be=be, device=device), divisor=divisor,
        q_chunk=check_optional_positive_int(call.q_chunk_size, "q_chunk_size"),
        kv_chunk=check_optional_positive_int(call.kv_chunk_size, "kv_chunk_size"),
        is_causal=check_bool(call.is_causal, "is_causal"), dropout_p=dropout_p, seed=seed, masked=masked,
        biased=biased, with_lse=check_bool(call.return_lse, "return_lse"),
        batch_invariant=check_bool(call.batch_invariant, "batch_invariant"),
        q_lengths=check_lengths(call.q_seq_lengths, "q_seq_lengths", sizes.batch, sizes.q_len, "q_len", be=be),
        kv_lengths=check_lengths(call.kv_seq_lengths, "kv_seq_lengths", sizes.batch, sizes.kv_len, kv_axis, be=be),
        window=check_window(call.local_window_size), softcap=check_softcap(call.softcap),
        dequantized_key_bytes=dequantized_key_bytes, backward=backward)
