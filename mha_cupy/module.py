"""The stateful multi-head attention layer (TabPFN's ``MultiHeadAttention``).

Letters as in ``mha_cupy.attention`` (K = ``N // share_kv_across_n_heads``).

A call is checked and resolved into a ``CallPlan`` (``_layer_plan``) before
anything changes, then executed here.
"""

from __future__ import annotations

import inspect
from typing import Any

from ._backends import DEFAULT_DTYPE, QUANTIZED_MAX, backend_of, convert, device_of, dtype_name, resolve_backend
from . import _route
from ._cache import attended, precomputed_cache, prepared
from ._random import random_seed
from ._layer_plan import CallOptions, CallPlan, LayerState, plan_call
from ._layer_vjp import differentiable_call, layer_vjp
from ._projections import queries_keys_values, rows_matmul
from ._validation import (
    keyword_hints,
    check_array,
    check_bool,
    check_finite_real,
    check_positive_int,
    check_precomputed_combination,
    check_probability,
    check_scale,
    check_seed,
    check_shape_and_dtype,
)
from .weights import Weights, checked_weights, initial_weights

__all__ = ["MultiHeadAttention"]


_PRECOMPUTED_NAMES = ("precomputed_k", "precomputed_v", "precomputed_kv")


class MultiHeadAttention:
    """Multi-head attention with TabPFN 2.2.1's semantics on any Array API library.

    Parameters
    ----------
    emsize : int
        Input and output size E.
    nhead : int
        Query heads N.
    d_k, d_v : int
        Key/query size H and value size V per head.
    share_kv_across_n_heads : int
        Query heads per key/value head; must divide ``nhead`` (K = N // it).
    dropout_p : float, optional
        Attention-weight dropout, applied only on calls with ``training=True``.
    softmax_scale : float, optional
        Logit scale; default ``1 / sqrt(d_k)``.
    initialize_output_to_zero : bool
        ``w_out`` starts at zero instead of Xavier-uniform.
    init_gain : float
        Gain of the input-projection init (TabPFN's ``attention_init_gain``).
    precomputed_k, precomputed_v : array, optional
        ``[B, S, K|1, H]`` and ``[B, S, K|1, V]``: fixed keys/values; the layer
        then has no key/value weights and is called with ``use_cached_kv=True``.
    precomputed_kv : array, optional
        ``[B, S, 2, K|1, H]``, the same stacked.
    dtype : dtype or str
        Float dtype of weights, inputs and outputs (a name, a NumPy dtype or a
        dtype of ``xp``); default ``numpy.float32``, meaning float32 of ``xp``.
    xp : module or str, optional
        Array namespace: a module or ``"numpy"``, ``"cupy"``, ``"torch"``,
        ``"array_api_strict"``, ``"jax"``, ``"dask"``. Default: the namespace of the precomputed
        arrays if given, else NumPy.
    device : optional
        Device of the weights; default the namespace's default (or the
        precomputed arrays').
    seed : int, optional
        64-bit seed for weight init and dropout; ``None`` draws one from the
        operating system. The same seed gives bitwise-identical weights on
        every library.
    kv_cache_dtype : {None, "int8", "float8_e4m3fn"}
        Store the keys and values that calls cache (``cache_kv=True``)
        quantized, as TabPFN 9's ``QuantizedKVCacheEntry`` does: symmetric,
        one scale per batch row (``max |x| / 127`` for int8, ``/ 448`` for
        float8_e4m3fn, whose values are clamped to its finite range). Each
        append keeps its own scales (nothing stored is requantized);
        ``kv_cache_scales`` holds them per batch row and key. Calls that read
        the cache dequantize it one key chunk at a time. float8 needs a
        library with that dtype (torch, JAX, NumPy with ml_dtypes); not on
        Dask. Precomputed keys and values are stored as given.

    Weight layouts follow the reference: ``w_qkv [3, N, H, E]`` when
    ``d_k == d_v``, ``K == N`` and nothing is precomputed; otherwise
    ``w_q [1, N, H, E]`` with ``w_kv [2, K, H, E]`` (``d_k == d_v``) or
    ``w_k [K, H, E]`` and ``w_v [K, V, E]``; always ``w_out [N, V, E]``.

    Examples
    --------
    >>> import numpy as np
    >>> import mha_cupy
    >>> layer = mha_cupy.MultiHeadAttention(emsize=64, nhead=4, d_k=16, d_v=16, seed=0)
    >>> x = np.random.default_rng(0).standard_normal((8, 128, 64)).astype(np.float32)   # [batch, T, E]
    >>> y = layer(x)                                  # self-attention
    >>> y.shape, y.dtype, layer.w_qkv.shape
    ((8, 128, 64), dtype('float32'), (3, 4, 16, 64))
    >>> _ = layer(x, cache_kv=True)                   # keep the keys and values of x
    >>> layer(x[:, :5], use_cached_kv=True).shape     # five new rows attend over them
    (8, 5, 64)
    >>> mha_cupy.compare(layer(x[:, :5], use_cached_kv=True), layer(x[:, :5], x)).ok
    True
    """

    @keyword_hints
    def __init__(
        self,
        *,
        emsize: int,
        nhead: int,
        d_k: int,
        d_v: int,
        share_kv_across_n_heads: int = 1,
        dropout_p: float | None = None,
        softmax_scale: float | None = None,
        initialize_output_to_zero: bool = False,
        init_gain: float = 1.0,
        precomputed_k: Any = None,
        precomputed_v: Any = None,
        precomputed_kv: Any = None,
        dtype: Any = DEFAULT_DTYPE,
        xp: Any = None,
        device: Any = None,
        seed: int | None = None,
        kv_cache_dtype: str | None = None,
    ) -> None:
        self.emsize, self.nhead, self.d_k, self.d_v = (check_positive_int(n, name) for n, name in (
            (emsize, "emsize"), (nhead, "nhead"), (d_k, "d_k"), (d_v, "d_v")))
        self.share_kv_across_n_heads = check_positive_int(share_kv_across_n_heads, "share_kv_across_n_heads")
        self.nhead_kv = _kv_heads(self.nhead, self.share_kv_across_n_heads)
        self.dropout_p = None if dropout_p is None else check_probability(dropout_p, "dropout_p")
        #: The logit scale every call uses, resolved once.
        self.scale = check_scale(softmax_scale, d_k, "softmax_scale")
        self.softmax_scale = None if softmax_scale is None else self.scale
        check_bool(initialize_output_to_zero, "initialize_output_to_zero")
        self.init_gain = check_finite_real(init_gain, "init_gain")
        self.seed = random_seed() if seed is None else check_seed(seed)
        self._calls = 0
        precomputed = (precomputed_k, precomputed_v, precomputed_kv)
        self._be, self.dtype, self.device = _placement(precomputed, xp, dtype, device)
        self._kv_cache_dtype = _check_kv_cache_dtype(kv_cache_dtype, self._be)
        weights = initial_weights(self._sizes, gain=self.init_gain, seed=self.seed, dtype=self.dtype, xp=self.xp,
                                  device=self.device, with_kv=all(p is None for p in precomputed),
                                  zero_output=initialize_output_to_zero)
        self.set_parameters(precomputed_k=precomputed_k, precomputed_v=precomputed_v,
                            precomputed_kv=precomputed_kv, **weights)

    # ------------------------------------------------------------------ parameters

    @keyword_hints
    def set_parameters(
        self,
        w_out: Any,
        w_q: Any = None,
        w_k: Any = None,
        w_v: Any = None,
        w_kv: Any = None,
        w_qkv: Any = None,
        precomputed_k: Any = None,
        precomputed_v: Any = None,
        precomputed_kv: Any = None,
    ) -> None:
        """Replace the weights (and the cache, by the precomputed keys/values or nothing).

        Exactly one of ``w_qkv``/``w_q``; key/value weights (``w_kv``, or
        ``w_k`` with ``w_v``, or the last two thirds of ``w_qkv``) or
        precomputed keys/values, not both. Arrays must be of the layer's
        namespace, device and dtype; they are stored as given (not copied).
        """
        given = dict(w_out=w_out, w_q=w_q, w_k=w_k, w_v=w_v, w_kv=w_kv, w_qkv=w_qkv,
                     precomputed_k=precomputed_k, precomputed_v=precomputed_v, precomputed_kv=precomputed_kv)
        weights = checked_weights(given, sizes=self._sizes, dtype=self.dtype, be=self._be, device=self.device)
        cache = precomputed_cache(precomputed_k, precomputed_v, precomputed_kv, kv_heads=self.nhead_kv, d_k=self.d_k,
                                  d_v=self.d_v, dtype=self.dtype, be=self._be)
        self._weights, self._cache = weights, cache

    xp = property(lambda self: self._be.xp, doc="The layer's array namespace.")

    @property
    def _sizes(self) -> tuple[int, int, int, int, int]:
        """``(N, K, H, V, E)``."""
        return self.nhead, self.nhead_kv, self.d_k, self.d_v, self.emsize

    w_out = property(lambda self: self._weights.w_out, doc="``[N, V, E]``")
    w_q = property(lambda self: self._weights.w_q, doc="``[1, N, H, E]`` or None")
    w_k = property(lambda self: self._weights.w_k, doc="``[K, H, E]`` or None")
    w_v = property(lambda self: self._weights.w_v, doc="``[K, V, E]`` or None")
    w_kv = property(lambda self: self._weights.w_kv, doc="``[2, K, H, E]`` or None")
    w_qkv = property(lambda self: self._weights.w_qkv, doc="``[3, N, H, E]`` or None")

    @property
    def weights(self) -> Weights:
        """All weights in one frozen layout object (``mha_cupy.weights.Weights``): which exist and how queries,
        keys and values are read from them. Replace them with ``set_parameters``."""
        return self._weights

    @property
    def kv_cache(self) -> Any:
        """Cached ``[B, S, 2, K|1, H]`` keys and values, or None."""
        return self._cache.views()[0] if self._cache is not None and self._cache.is_kv else None

    @property
    def k_cache(self) -> Any:
        """Cached ``[B, S, K|1, H]`` keys, or None."""
        return self._cache.views()[0] if self._cache is not None and not self._cache.is_kv else None

    @property
    def v_cache(self) -> Any:
        """Cached ``[B, S, K|1, V]`` values, or None."""
        return self._cache.views()[1] if self._cache is not None and not self._cache.is_kv else None

    @property
    def kv_cache_dtype(self) -> str | None:
        """The storage dtype of cached keys and values (``"int8"``, ``"float8_e4m3fn"``), or None: the layer's dtype."""
        return self._kv_cache_dtype

    @property
    def kv_cache_scales(self) -> tuple[Any, Any] | None:
        """Scales ``([B, S, 1, 1], [B, S, 1, 1])`` of the cached keys and values (``k_cache * scale`` is what they
        stand for), or None when the cache is not quantized."""
        if self._cache is None or self._cache.scales is None:
            return None
        return self._cache.scales_of(0, self._cache.batch)

    @property
    def has_cached_kv(self) -> bool:
        return self._cache is not None

    def empty_kv_cache(self) -> None:
        """Drop the cached keys and values."""
        self._cache = None

    # ------------------------------------------------------------------ conversion

    @keyword_hints
    def to(self, xp: Any, device: Any = None, *, dtype: Any = None) -> MultiHeadAttention:
        """A new layer with the same weights, cache, seed and dropout stream in namespace ``xp`` on ``device``.

        ``dtype`` (a name such as ``"bfloat16"``, or a dtype of any library; default: this layer's) casts the weights
        and the cache's floating arrays (a quantized cache keeps its int8/float8 entries; its scales are cast), as
        ``torch.nn.Module.to(dtype)`` does. Raises TypeError for a dtype ``xp`` does not have (NumPy has no
        bfloat16), before anything is built.
        """
        return _moved(self, resolve_backend(xp), device, dtype)

    def __repr__(self) -> str:
        return (
            f"MultiHeadAttention(emsize={self.emsize}, nhead={self.nhead}, d_k={self.d_k}, d_v={self.d_v}, "
            f"share_kv_across_n_heads={self.share_kv_across_n_heads}, dtype={self._be.dtype_name(self.dtype)}, "
            f"xp={self._be.name}, device={self.device})"
        )

    # ------------------------------------------------------------------ forward

    def __call__(self, x: Any, x_kv: Any = None, **options: Any) -> Any:
        """Attention of ``x`` over ``x_kv`` (or itself, or the cache).

        Parameters
        ----------
        x : array, shape ``[..., T, E]``
            Queries (and keys/values in self-attention).
        x_kv : array, shape ``[..., S, E]``, optional
            Keys/values source with the leading dimensions of ``x``.
        cache_kv : bool
            Store this call's keys/values (replacing the cache, or appended to
            it with ``append_kv``).
        add_input : bool
            Return ``x + attention(x)`` (residual).
        allow_inplace : bool
            ``x`` may be overwritten with the result.
        save_peak_mem_factor : int, optional
            Split the flattened batch into this many parts and write each part's
            result into ``x`` in place (needs ``allow_inplace``; on libraries
            whose arrays are immutable, JAX, the parts are concatenated
            instead); the attention working-set budget is divided by it too.
        reuse_first_head_kv : bool
            Cross-attention only: project keys/values with the first kv head's
            weights and share them across all heads.
        only_cache_first_head_kv : bool
            With ``cache_kv``, cache only the first kv head (``[.., 1, d]``);
            ignored without ``cache_kv``.
        use_cached_kv : bool
            Attend to the cached keys/values (``x_kv`` must be None).
        training : bool
            Apply dropout (when the layer has ``dropout_p``), drawing call
            ``i``'s mask from ``derive_seed(seed, STREAMS['dropout'], i)``.
        q_chunk_size, kv_chunk_size, memory_budget, workers
            Passed to the chunked core (see ``scaled_dot_product_attention``).
        append_kv : bool
            With ``cache_kv``: append to the existing cache (amortised O(new)
            growth) and attend to the whole updated cache.
        batch_invariant : bool
            Every output row bitwise the same whatever else is in the call, on
            the same machine and library versions: projections and attention as
            fixed-order products row by row, attention in whole key chunks (see
            ``scaled_dot_product_attention`` and the user guide's "Batch
            invariance" for what is promised).
        kv_seq_lengths : integer array ``[B]``, optional
            Keys per flattened batch row (cached ones included; array of the
            layer's library): keys past a row's length are padding, never
            attended (``scaled_dot_product_attention``'s ``kv_seq_lengths``).

        Returns
        -------
        array, shape ``[..., T, E]``
            Same namespace, device and dtype as ``x``.
        """
        opts = CallOptions.from_keywords(options, where="MultiHeadAttention.__call__")
        state = self._state()
        plan = plan_call(state, x, x_kv, opts)
        if self._be.needs_grad(x, x_kv, *self._weights.present().values()):
            return differentiable_call(state, plan, x, x_kv, lambda x, x_kv: self._run(state, plan, x, x_kv))
        return self._run(state, plan, x, x_kv)

    def vjp(self, x: Any, d_out: Any, x_kv: Any = None, **call_keywords: Any) -> tuple[Any, Any, dict[str, Any]]:
        """Gradients of ``sum(self(x, x_kv, **call_keywords) * d_out)``: ``(dx, dx_kv, grads)``.

        A forward call and its FlashAttention-2 backward, memory-bounded like
        the forward (score tiles recomputed from the forward's log-sum-exp).
        ``call_keywords`` are ``__call__``'s; those that write the cache or
        ``x`` (``cache_kv``, ``allow_inplace``) are refused. Cached keys and
        values (``use_cached_kv``) are constants. With ``training`` the call
        draws the next dropout mask, as a forward call would.

        Parameters
        ----------
        x : array, shape ``[..., T, E]``
        d_out : array, shape ``[..., T, E]``
            Gradient of the output; ``x``'s namespace, device and dtype.
        x_kv : array, shape ``[..., S, E]``, optional

        Returns
        -------
        dx : array like ``x``
        dx_kv : array like ``x_kv``, or None without ``x_kv``
        grads : dict
            Weight name to gradient in that weight's layout, for the weights
            the layer has (``w_qkv`` or ``w_q`` with ``w_kv`` or ``w_k``, ``w_v``; ``w_out``).
        """
        opts = CallOptions.from_keywords(call_keywords, where="MultiHeadAttention.vjp")
        for name in ("cache_kv", "allow_inplace"):
            if getattr(opts, name):
                msg = f"vjp does not write the cache or x: {name} must be False, got {getattr(opts, name)!r}"
                raise ValueError(msg)
        state = self._state()
        plan = plan_call(state, x, x_kv, opts, backward=True)
        check_array(d_out, "d_out")
        backend_of(x, d_out, names=("x", "d_out"))
        check_shape_and_dtype(d_out, "d_out", tuple(x.shape), legend="like x", dtype=self.dtype, be=self._be)
        grads = layer_vjp(state, plan, x, x_kv, d_out)
        if plan.attention.dropout_key is not None:
            self._calls += 1  # a vjp is a forward call too: the next call draws the next mask
        return grads

    def _run(self, state: LayerState, plan: CallPlan, x: Any, x_kv: Any) -> Any:
        """Execute a resolved call: the only place a call changes the layer."""
        xp, E = self.xp, self.emsize
        x_flat = xp.reshape(x, (plan.batch, plan.q_len, E))
        kv_flat = xp.reshape(x_kv, (plan.batch, plan.kv_len, E)) if plan.kv_source == "cross" else None
        if plan.attention.dropout_key is not None:
            self._calls += 1
        if plan.cache_mode == "replace":
            self._cache = None  # free the old cache before allocating the new one
        self._cache, offset = prepared(self._cache, plan.cache_mode, plan.cache_shapes, plan.kv_len, be=self._be,
                                       dtype=self.dtype, device=self.device, quantized=self._kv_cache_dtype)
        results = []
        for b0, b1 in plan.parts:
            kv_part = None if kv_flat is None else kv_flat[b0:b1, ...]
            y = self._part(state, plan, x_flat[b0:b1, ...], kv_part, b0, b1, offset)
            if plan.add_input:
                y = x_flat[b0:b1, ...] + y
            if plan.write_into_x:
                x_flat[b0:b1, ...] = y
            else:
                results.append(y)
        out = x_flat if plan.write_into_x else (results[0] if len(results) == 1 else xp.concat(results, axis=0))
        return xp.reshape(out, x.shape)

    def _part(self, state: LayerState, plan: CallPlan, x: Any, x_kv: Any, b0: int, b1: int, offset: int) -> Any:
        """Output ``[b, T, E]`` for flattened batch rows ``b0:b1``."""
        q, k, v = queries_keys_values(state, plan, x, x_kv, b0, b1)
        self._cache, k, v, scales = attended(self._cache, plan.cache_mode, plan.kv_source, plan.cache_shapes, k, v,
                                             (b0, b1), offset, be=self._be)
        heads = _route.forward(q, k, v, be=self._be, plan=plan.attention, scales=scales, offsets=(b0, 0, 0),
                               gradient=False)
        N, V, T = self.nhead, self.d_v, q.shape[1]
        return rows_matmul(state, plan, self.xp.reshape(heads, (b1 - b0, T, N * V)),
                           self.xp.reshape(self._weights.w_out, (N * V, self.emsize)))

    def _state(self) -> LayerState:
        """What a call needs of this layer, read once (``_layer_plan.LayerState``)."""
        return LayerState(be=self._be, device=self.device, dtype=self.dtype, emsize=self.emsize, nhead=self.nhead,
                          nhead_kv=self.nhead_kv, d_k=self.d_k, d_v=self.d_v, scale=self.scale,
                          dropout_p=self.dropout_p, seed=self.seed, calls=self._calls, weights=self._weights,
                          cache=self._cache)


def _moved(layer: MultiHeadAttention, target: Any, device: Any, dtype: Any) -> MultiHeadAttention:
    """``layer.to(target's xp, device, dtype=dtype)``."""
    if device is not None and dtype_name(device) in target.float_dtypes():
        msg = f"device must be a device of {target.name}, got the dtype {device!r}; pass dtypes as .to(xp, dtype=...)"
        raise TypeError(msg)
    dtype = target.float_dtype(layer._be.dtype_name(layer.dtype) if dtype is None else
                               dtype if isinstance(dtype, str) else dtype_name(dtype))
    _check_kv_cache_dtype(layer._kv_cache_dtype, target)
    new = object.__new__(MultiHeadAttention)
    new.__dict__.update(layer.__dict__)
    new._be, new.dtype = target, dtype
    new.device = target.default_device() if device is None else target.check_device(device)

    def cast(a: Any) -> Any:
        return target.xp.astype(a, dtype, copy=False)

    new._weights = layer._weights.map(lambda a: cast(convert(a, target, new.device)))
    if layer._cache is not None:
        new._cache = layer._cache.moved(lambda a: convert(a, target, new.device), cast)
    return new


def _kv_heads(nhead: int, share: int) -> int:
    if nhead % share:
        msg = f"nhead must be divisible by share_kv_across_n_heads: nhead {nhead}, got share_kv_across_n_heads {share}"
        raise ValueError(msg)
    return nhead // share


def _placement(precomputed: tuple[Any, Any, Any], xp: Any, dtype: Any, device: Any) -> tuple[Any, Any, Any]:
    """A new layer's adapter, dtype and device: ``xp``, else the precomputed arrays' library (and device)."""
    check_precomputed_combination(*precomputed)
    present = [p for p in precomputed if p is not None]
    be = backend_of(*precomputed, names=_PRECOMPUTED_NAMES) if xp is None and present else resolve_backend(xp)
    if device is None:
        device = device_of(present[0]) if present else be.default_device()
    return be, be.float_dtype(dtype), be.check_device(device)


def _check_kv_cache_dtype(name: Any, be: Any) -> str | None:
    """``kv_cache_dtype``: None, or the name of a quantized dtype ``be`` stores (not on lazy libraries)."""
    if name is None:
        return None
    offered = sorted(set(be.quantized_dtypes()) & set(QUANTIZED_MAX))
    if not isinstance(name, str) or name not in QUANTIZED_MAX:
        msg = f"kv_cache_dtype must be None or one of {sorted(QUANTIZED_MAX)}, got {name!r}"
        raise (TypeError if not isinstance(name, str) else ValueError)(msg)
    if name not in offered or be.lazy_blocks:
        msg = (
            f"kv_cache_dtype={name!r} is not available on {be.name} (offers {offered or 'none'}"
            f"{'; lazy arrays keep their cache unquantized' if be.lazy_blocks else ''}); use None or another library"
        )
        raise ValueError(msg)
    return name


# help() and editors show the call's keywords, whose defaults live in CallOptions alone.
MultiHeadAttention.__call__.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
    inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    inspect.Parameter("x", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    inspect.Parameter("x_kv", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
    *CallOptions.parameters(),
])
