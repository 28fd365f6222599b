"""One layer call resolved into a frozen plan: every argument checked, every choice made,
before the layer's cache, weights or dropout stream change.

Letters as in ``mha_cupy.attention``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, fields
from typing import Any

from ._backends import Backend, backend_of, device_of, same_device
from ._cache import KVCache
from ._call import AttentionCall, check_options
from ._plan import AttentionPlan, Sizes, ceil_div, dequantized_key_bytes, plan_attention
from ._random import STREAMS, derive_seed
from ._validation import (check_array, check_bool, check_keywords, check_optional_positive_int, check_shape_and_dtype,
                          shape_str)
from .weights import Weights

__all__ = ["CallPlan", "CallOptions", "LayerState", "plan_call"]

@dataclass(frozen=True)
class CallOptions:
    """The keywords of a layer call and their defaults: the one place those defaults are written
    (``MultiHeadAttention.__call__`` and ``.vjp`` take ``**options`` and build this; see ``__call__`` for each)."""

    cache_kv: bool = False
    add_input: bool = False
    allow_inplace: bool = False
    save_peak_mem_factor: int | None = None
    reuse_first_head_kv: bool = False
    only_cache_first_head_kv: bool = False
    use_cached_kv: bool = False
    training: bool = False
    q_chunk_size: int | None = None
    kv_chunk_size: int | None = None
    append_kv: bool = False
    memory_budget: int | str | None = None
    workers: int | None = None
    batch_invariant: bool = False
    kv_seq_lengths: Any = None

    @classmethod
    def from_keywords(cls, keywords: dict[str, Any], *, where: str) -> CallOptions:
        """The options of a call with ``keywords``; an unknown keyword is a TypeError naming it (with the
        closest known name) and ``where`` it was given."""
        check_keywords(keywords, [f.name for f in fields(cls)], where=where)
        return cls(**keywords)

    @classmethod
    def parameters(cls) -> list[inspect.Parameter]:
        """The keywords as keyword-only parameters, for the signatures of the calls that take them."""
        return [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
                for f in fields(cls)]


#: The options that must be bools.
_FLAGS = tuple(f.name for f in fields(CallOptions) if f.type == "bool")


@dataclass(frozen=True)
class LayerState:
    """What a call needs of its layer, read once by ``MultiHeadAttention`` (sizes, numerics, weights, cache and
    the count of dropout calls), so that planning, projections and the vjp never reach into the layer."""

    be: Backend
    device: Any
    dtype: Any
    emsize: int
    nhead: int
    nhead_kv: int
    d_k: int
    d_v: int
    scale: float
    dropout_p: float | None
    seed: int
    calls: int
    weights: Weights
    cache: KVCache | None

    @property
    def xp(self) -> Any:
        return self.be.xp


@dataclass(frozen=True)
class CallPlan:
    """What one layer call does."""

    #: Flattened batch rows B, query length T, and the keys/values' source length (new rows).
    batch: int
    q_len: int
    kv_len: int
    #: Where keys/values come from: ``"self"`` (x), ``"cross"`` (x_kv) or ``"cache"``.
    kv_source: str
    #: kv heads projected from x / x_kv: K, or 1 with ``reuse_first_head_kv``.
    project_heads: int
    #: None, ``"replace"`` or ``"append"``, and the cache's per-array shapes for a new one.
    cache_mode: str | None
    cache_shapes: tuple[tuple[int, ...], ...]
    add_input: bool
    #: Flattened batch ranges computed one after another (``save_peak_mem_factor``).
    parts: tuple[tuple[int, int], ...]
    #: Each part's result is written into ``x`` (the factor, on libraries with item assignment).
    write_into_x: bool
    attention: AttentionPlan
    #: Projections as fixed-order products (``batch_invariant``): a row's bits do not depend on the other rows.
    fixed_order: bool = False


def plan_call(layer: LayerState, x: Any, x_kv: Any, opts: CallOptions, *, backward: bool = False) -> CallPlan:
    """Check a call of ``layer`` and resolve it (``backward``: the attention's tiles sized for a vjp); raises before
    anything changes."""
    for name in _FLAGS:
        check_bool(getattr(opts, name), name)
    factor = check_optional_positive_int(opts.save_peak_mem_factor, "save_peak_mem_factor", minimum=2)
    _check_flag_combinations(opts, factor)
    if x_kv is x:
        x_kv = None  # the reference treats x_kv identical to x as self-attention
    _check_inputs(layer, x, x_kv, opts)
    B, T = math.prod(x.shape[:-2]), x.shape[-2]
    source = "cache" if opts.use_cached_kv else ("self" if x_kv is None else "cross")
    new_len = T if x_kv is None else x_kv.shape[-2]
    cache = layer.cache
    if opts.use_cached_kv and cache.batch != B:
        msg = f"x has {B} flattened batch rows but the cache holds {cache.batch}"
        raise ValueError(msg)
    mode, shapes = _cache_mode(layer, opts, B, new_len)
    kv_len = cache.length if source == "cache" else new_len
    if mode == "append":
        kv_len = cache.length + new_len
    # Lazy chunked arrays (Dask) run as one part: their chunks, not the factor, bound each task's memory.
    step = max(1, B if factor is None or layer.be.lazy_blocks else ceil_div(B, factor))
    parts = tuple((b0, min(B, b0 + step)) for b0 in range(0, B, step)) or ((0, 0),)
    attention = _attention_plan(layer, opts, Sizes(step, T, kv_len, layer.nhead, layer.nhead_kv, layer.d_k, layer.d_v),
                                batch=B, divisor=factor or 1, backward=backward,
                                reads_quantized=cache is not None and cache.quantized is not None
                                and (source == "cache" or mode == "append"))
    return CallPlan(
        batch=B, q_len=T, kv_len=new_len, kv_source=source,
        project_heads=1 if opts.reuse_first_head_kv else layer.nhead_kv, cache_mode=mode, cache_shapes=shapes,
        add_input=opts.add_input, parts=parts, write_into_x=factor is not None and layer.be.item_assignment,
        attention=attention, fixed_order=opts.batch_invariant,
    )


def _attention_plan(layer: LayerState, opts: CallOptions, sizes: Sizes, *, batch: int, divisor: int,
                    reads_quantized: bool, backward: bool) -> AttentionPlan:
    """The attention plan of one part (``sizes``) of a call over ``batch`` rows: the layer's scale and dropout
    (call ``layer.calls``'s seed), the call's tuning; a quantized cache read dequantizes chunk by chunk, and
    those chunks count in the budget."""
    seed = None
    if opts.training and layer.dropout_p:
        seed = derive_seed(layer.seed, STREAMS["dropout"], layer.calls)
    call = AttentionCall(None, None, None, scale=layer.scale, dropout_p=layer.dropout_p if seed is not None else 0.0,
                         seed=seed, q_chunk_size=opts.q_chunk_size, kv_chunk_size=opts.kv_chunk_size,
                         memory_budget=opts.memory_budget, workers=opts.workers, batch_invariant=opts.batch_invariant,
                         kv_seq_lengths=opts.kv_seq_lengths)
    dequantized = dequantized_key_bytes(sizes, layer.be.itemsize(layer.dtype), keys=reads_quantized,
                                        values=reads_quantized)
    problem = check_options(call, be=layer.be, device=layer.device, dtype=layer.dtype,
                            sizes=sizes._replace(batch=batch), dequantized_key_bytes=dequantized, divisor=divisor,
                            backward=backward, kv_axis="the keys' length, cached ones included")
    return plan_attention(dataclasses.replace(problem, sizes=sizes))


def _check_flag_combinations(opts: CallOptions, factor: int | None) -> None:
    if opts.cache_kv and opts.use_cached_kv:
        msg = "cache_kv and use_cached_kv cannot both be True: a call either stores new keys/values or uses stored ones"
        raise ValueError(msg)
    if opts.append_kv and not opts.cache_kv:
        msg = "append_kv=True needs cache_kv=True, got cache_kv=False"
        raise ValueError(msg)
    if factor is not None and not opts.allow_inplace:
        msg = (
            f"save_peak_mem_factor={factor} writes results into x and needs allow_inplace=True, got allow_inplace=False"
        )
        raise ValueError(msg)


def _check_inputs(layer: LayerState, x: Any, x_kv: Any, opts: CallOptions) -> None:
    check_array(x, "x")
    if x_kv is not None:
        check_array(x_kv, "x_kv")
    be = backend_of(x, x_kv, opts.kv_seq_lengths, names=("x", "x_kv", "kv_seq_lengths"))
    if be.xp is not layer.xp:
        msg = f"x must be an array of the layer's namespace {layer.be.name}, got {be.name}; use .to()"
        raise TypeError(msg)
    if not same_device(device_of(x), layer.device):
        msg = f"x must be on the layer's device {layer.device}, got {device_of(x)}; use .to()"
        raise ValueError(msg)
    E = layer.emsize
    if x.ndim < 2:
        msg = f"x must have shape [..., seq_len, emsize={E}], got shape {shape_str(x.shape)}"
        raise ValueError(msg)
    todo = f"cast x to {be.dtype_name(layer.dtype)}, or build the layer with dtype={{got}}"
    check_shape_and_dtype(x, "x", (*x.shape[:-1], E), legend="[..., seq_len, emsize]", dtype=layer.dtype, be=be,
                          hint=todo)
    if x_kv is not None:
        check_shape_and_dtype(x_kv, "x_kv", (*x.shape[:-2], None, E), legend="[..., kv_len, emsize]",
                              dtype=layer.dtype, be=be)
    if opts.use_cached_kv:
        if layer.cache is None:
            msg = ("use_cached_kv=True but the cache is empty; call with cache_kv=True first or pass precomputed "
                   "keys/values")
            raise ValueError(msg)
        if x_kv is not None:
            msg = "use_cached_kv=True takes keys/values from the cache, so x_kv must be None"
            raise ValueError(msg)
    elif not layer.weights.has_kv:
        msg = "this layer has no key/value weights (precomputed keys/values); call it with use_cached_kv=True"
        raise ValueError(msg)
    if opts.reuse_first_head_kv and x_kv is None and not opts.use_cached_kv:
        msg = "reuse_first_head_kv=True is for cross-attention and needs x_kv, got x_kv=None"
        raise ValueError(msg)


def _cache_mode(layer: LayerState, opts: CallOptions, B: int,
                new_len: int) -> tuple[str | None, tuple[tuple[int, ...], ...]]:
    """Whether the call replaces or appends to the cache, and the shapes a new cache would have."""
    if not opts.cache_kv:
        return None, ()
    kh = 1 if (opts.reuse_first_head_kv or opts.only_cache_first_head_kv) else layer.nhead_kv
    if layer.weights.stacked_kv:
        shapes: tuple[tuple[int, ...], ...] = ((B, new_len, 2, kh, layer.d_k),)
    else:
        shapes = ((B, new_len, kh, layer.d_k), (B, new_len, kh, layer.d_v))
    if not (opts.append_kv and layer.cache is not None):
        return "replace", shapes
    have = layer.cache.layout()
    want = [(s[0], *s[2:]) for s in shapes]
    if have != want:
        msg = (
            f"append_kv=True must match the cached layout [batch, *, ...] {have}, got {want} "
            "(same batch, kv heads and only_cache_first_head_kv/reuse_first_head_kv setting)"
        )
        raise ValueError(msg)
    return "append", shapes
