"""The stateful multi-head attention layer (TabPFN's ``MultiHeadAttention``) and its KV cache.

Letters: B batch (all leading dimensions flattened), T query length, S key
length, E emsize, N heads, K kv heads (``N // share_kv_across_n_heads``),
H d_k, V d_v.
"""

from __future__ import annotations

from typing import Any

from . import dropout as _dropout
from ._budget import get_memory_budget, parse_memory_budget, plan_chunks
from ._namespace import (
    DEFAULT_DTYPE,
    compute_dtype,
    convert,
    default_device,
    device_of,
    dtype_name,
    is_cpu,
    itemsize,
    namespace_name,
    namespace_of,
    resolve_dtype,
    resolve_namespace,
)
from ._validation import (
    check_bool,
    check_optional_positive_int,
    check_positive_int,
    check_probability,
    check_shape_and_dtype,
    shape_str,
)
from ._threads import resolve_workers
from .attention import attend, check_scale
from .weights import STREAMS, init_uniform, input_weight_bound, output_weight_bound

__all__ = ["MultiHeadAttention"]

_WEIGHT_NAMES = ("w_out", "w_q", "w_k", "w_v", "w_kv", "w_qkv")
_PRECOMPUTED_NAMES = ("precomputed_k", "precomputed_v", "precomputed_kv")


class _Cache:
    """Keys/values along the sequence axis with spare capacity, so appends cost amortised O(new).

    ``kv`` layout holds one array ``[B, cap, 2, K, H]``; ``k``/``v`` layout holds
    ``[B, cap, K, H]`` and ``[B, cap, K, V]``. ``length`` rows are valid.
    """

    def __init__(self, arrays: tuple[Any, ...], length: int) -> None:
        self.arrays = arrays
        self.length = length

    @property
    def is_kv(self) -> bool:
        return len(self.arrays) == 1

    def views(self) -> tuple[Any, ...]:
        return tuple(a[:, : self.length, ...] for a in self.arrays)

    def keys_values(self, b0: int, b1: int) -> tuple[Any, Any]:
        """Views of the valid keys ``[b, S, K|1, H]`` and values ``[b, S, K|1, V]`` of batch rows ``b0:b1``."""
        views = self.views()
        if self.is_kv:
            return views[0][b0:b1, :, 0, ...], views[0][b0:b1, :, 1, ...]
        return views[0][b0:b1, ...], views[1][b0:b1, ...]

    def write(self, batch: slice, rows: slice, k: Any, v: Any) -> None:
        """Store ``k``/``v`` (their first cached-heads heads) at ``[batch, rows]``."""
        kh = self.arrays[0].shape[-2]
        if self.is_kv:
            self.arrays[0][batch, rows, 0, ...] = k[:, :, :kh, ...]
            self.arrays[0][batch, rows, 1, ...] = v[:, :, :kh, ...]
        else:
            self.arrays[0][batch, rows, ...] = k[:, :, :kh, ...]
            self.arrays[1][batch, rows, ...] = v[:, :, :kh, ...]

    def reserve(self, extra: int, *, xp: Any) -> None:
        """Make room for ``extra`` more rows, doubling the capacity when full."""
        need = self.length + extra
        cap = self.arrays[0].shape[1]
        if need <= cap:
            return
        new_cap = max(need, 2 * cap)
        grown = []
        for a in self.arrays:
            b = xp.empty((a.shape[0], new_cap, *a.shape[2:]), dtype=a.dtype, device=device_of(a))
            b[:, : self.length, ...] = a[:, : self.length, ...]
            grown.append(b)
        self.arrays = tuple(grown)


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
        ``"array_api_strict"``. Default: the namespace of the precomputed
        arrays if given, else NumPy.
    device : optional
        Device of the weights; default the namespace's default (or the
        precomputed arrays').
    seed : int, optional
        64-bit seed for weight init and dropout; ``None`` draws one from the
        operating system. The same seed gives bitwise-identical weights on
        every library.

    Weight layouts follow the reference: ``w_qkv [3, N, H, E]`` when
    ``d_k == d_v``, ``K == N`` and nothing is precomputed; otherwise
    ``w_q [1, N, H, E]`` with ``w_kv [2, K, H, E]`` (``d_k == d_v``) or
    ``w_k [K, H, E]`` and ``w_v [K, V, E]``; always ``w_out [N, V, E]``.
    """

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
    ) -> None:
        self.emsize = check_positive_int(emsize, "emsize")
        self.nhead = check_positive_int(nhead, "nhead")
        self.d_k = check_positive_int(d_k, "d_k")
        self.d_v = check_positive_int(d_v, "d_v")
        self.share_kv_across_n_heads = check_positive_int(share_kv_across_n_heads, "share_kv_across_n_heads")
        if nhead % share_kv_across_n_heads:
            msg = f"nhead must be divisible by share_kv_across_n_heads: nhead {nhead}, got share_kv_across_n_heads {share_kv_across_n_heads}"
            raise ValueError(msg)
        self.nhead_kv = nhead // share_kv_across_n_heads
        self.dropout_p = None if dropout_p is None else check_probability(dropout_p, "dropout_p")
        self.softmax_scale = None if softmax_scale is None else check_scale(softmax_scale, d_k)
        check_bool(initialize_output_to_zero, "initialize_output_to_zero")
        if isinstance(init_gain, bool) or not isinstance(init_gain, (int, float)):
            msg = f"init_gain must be a float, got {type(init_gain).__name__} {init_gain!r}"
            raise TypeError(msg)
        self.init_gain = float(init_gain)
        self.seed = _dropout.random_seed() if seed is None else seed
        _dropout.split_seed(self.seed)
        self._calls = 0

        precomputed = (precomputed_k, precomputed_v, precomputed_kv)
        if xp is None and any(p is not None for p in precomputed):
            self.xp = namespace_of(*precomputed, names=_PRECOMPUTED_NAMES)
        else:
            self.xp = resolve_namespace(xp)
        xp = self.xp
        self.dtype = resolve_dtype(dtype, xp)
        if device is None:
            present = [p for p in precomputed if p is not None]
            device = device_of(present[0]) if present else default_device(xp)
        self.device = device

        if precomputed_k is not None and precomputed_kv is not None:
            msg = "pass precomputed_kv or precomputed_k/precomputed_v, got both"
            raise ValueError(msg)
        if (precomputed_k is None) != (precomputed_v is None):
            msg = "precomputed_k and precomputed_v come together, got only one of them"
            raise ValueError(msg)
        has_precomputed = precomputed_kv is not None or precomputed_k is not None

        def init(name: str, shape: tuple[int, ...], bound: float) -> Any:
            return init_uniform(shape, bound, seed=self.seed, name=name, dtype=self.dtype, xp=xp, device=device)

        N, K, H, V, E = nhead, self.nhead_kv, d_k, d_v, emsize
        weights: dict[str, Any] = {}
        if initialize_output_to_zero:
            weights["w_out"] = xp.zeros((N, V, E), dtype=self.dtype, device=device)
        else:
            weights["w_out"] = init("w_out", (N, V, E), output_weight_bound(N, V, E))
        if d_k == d_v and K == N and not has_precomputed:
            weights["w_qkv"] = init("w_qkv", (3, N, H, E), input_weight_bound(N, H, E, self.init_gain))
        else:
            weights["w_q"] = init("w_q", (1, N, H, E), input_weight_bound(N, H, E, self.init_gain))
            if not has_precomputed:
                if d_k == d_v:
                    weights["w_kv"] = init("w_kv", (2, K, H, E), input_weight_bound(N, H, E, self.init_gain))
                else:
                    weights["w_k"] = init("w_k", (K, H, E), input_weight_bound(N, H, E, self.init_gain))
                    weights["w_v"] = init("w_v", (K, V, E), input_weight_bound(N, V, E, self.init_gain))
        self.set_parameters(
            precomputed_k=precomputed_k, precomputed_v=precomputed_v, precomputed_kv=precomputed_kv, **weights
        )

    # ------------------------------------------------------------------ parameters

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
        names = tuple(given)
        if w_out is None:
            msg = "w_out is required, got None"
            raise ValueError(msg)
        xp = namespace_of(*given.values(), names=names)
        if xp is not self.xp:
            msg = f"weights must be arrays of the layer's namespace {namespace_name(self.xp)}, got {namespace_name(xp)}"
            raise TypeError(msg)
        for name, a in given.items():
            if a is not None and device_of(a) != self.device:
                msg = f"{name} must be on the layer's device {self.device}, got {device_of(a)}"
                raise ValueError(msg)

        def combo(ok: bool, text: str) -> None:
            if not ok:
                present = sorted(n for n, a in given.items() if a is not None)
                msg = f"set_parameters: {text}; got {present}"
                raise ValueError(msg)

        has_pre = precomputed_kv is not None or precomputed_k is not None
        has_kv_w = any(a is not None for a in (w_qkv, w_kv, w_k, w_v))
        combo((precomputed_k is None) == (precomputed_v is None), "precomputed_k and precomputed_v come together")
        combo(precomputed_kv is None or precomputed_k is None, "pass precomputed_kv or precomputed_k/v, not both")
        combo(has_pre != has_kv_w, "give key/value weights or precomputed keys/values, exactly one of the two")
        combo((w_qkv is None) != (w_q is None), "give exactly one of w_qkv and w_q")
        combo(w_qkv is None or (w_kv is None and w_k is None and w_v is None), "w_qkv excludes w_kv, w_k and w_v")
        combo(w_kv is None or (w_k is None and w_v is None), "w_kv excludes w_k and w_v")
        combo((w_k is None) == (w_v is None), "w_k and w_v come together")

        N, K, H, V, E = self.nhead, self.nhead_kv, self.d_k, self.d_v, self.emsize
        if (w_qkv is not None or w_kv is not None) and H != V:
            msg = f"w_qkv/w_kv need d_k == d_v, got d_k {H} and d_v {V}; use w_k and w_v"
            raise ValueError(msg)
        if w_qkv is not None and K != N:
            msg = f"w_qkv needs as many kv heads as heads, got nhead {N} and kv heads {K}; use w_q with w_kv"
            raise ValueError(msg)
        dt = self.dtype
        for name, shape in (
            ("w_out", (N, V, E)), ("w_q", (1, N, H, E)), ("w_k", (K, H, E)), ("w_v", (K, V, E)),
            ("w_kv", (2, K, H, E)), ("w_qkv", (3, N, H, E)),
        ):
            if given[name] is not None:
                check_shape_and_dtype(given[name], name, shape, dtype=dt, xp=xp)
        cache = None
        def cached_heads(a: Any, axis: int) -> int:
            # kv heads, or 1 for a first-head-only cache; anything else is reported against K
            return a.shape[axis] if a.ndim > axis and a.shape[axis] in (1, K) else K

        if precomputed_kv is not None:
            kh = cached_heads(precomputed_kv, 3)
            check_shape_and_dtype(precomputed_kv, "precomputed_kv", (None, None, 2, kh, H),
                                  legend="[batch, kv_len, 2, kv_heads or 1, d_k]", dtype=dt, xp=xp)
            cache = _Cache((precomputed_kv,), precomputed_kv.shape[1])
        elif precomputed_k is not None:
            kh = cached_heads(precomputed_k, 2)
            check_shape_and_dtype(precomputed_k, "precomputed_k", (None, None, kh, H),
                                  legend="[batch, kv_len, kv_heads or 1, d_k]", dtype=dt, xp=xp)
            Bc, Sc = precomputed_k.shape[:2]
            check_shape_and_dtype(precomputed_v, "precomputed_v", (Bc, Sc, kh, V),
                                  legend="[batch, kv_len, kv_heads or 1, d_v]", dtype=dt, xp=xp)
            cache = _Cache((precomputed_k, precomputed_v), Sc)
        self._w = {n: given[n] for n in _WEIGHT_NAMES}
        self._cache = cache

    w_out = property(lambda self: self._w["w_out"], doc="``[N, V, E]``")
    w_q = property(lambda self: self._w["w_q"], doc="``[1, N, H, E]`` or None")
    w_k = property(lambda self: self._w["w_k"], doc="``[K, H, E]`` or None")
    w_v = property(lambda self: self._w["w_v"], doc="``[K, V, E]`` or None")
    w_kv = property(lambda self: self._w["w_kv"], doc="``[2, K, H, E]`` or None")
    w_qkv = property(lambda self: self._w["w_qkv"], doc="``[3, N, H, E]`` or None")

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
    def has_cached_kv(self) -> bool:
        return self._cache is not None

    def empty_kv_cache(self) -> None:
        """Drop the cached keys and values."""
        self._cache = None

    def _has_kv_weights(self) -> bool:
        return any(self._w[n] is not None for n in ("w_qkv", "w_kv", "w_k"))

    # ------------------------------------------------------------------ conversion

    def to(self, xp: Any, device: Any = None) -> "MultiHeadAttention":
        """A new layer with the same weights, cache, seed and dropout stream in namespace ``xp`` on ``device``."""
        target = resolve_namespace(xp)
        new = object.__new__(MultiHeadAttention)
        new.__dict__.update(self.__dict__)
        new.xp = target
        new.dtype = resolve_dtype(dtype_name(self.dtype), target)
        new.device = default_device(target) if device is None else device
        new._w = {n: convert(a, target, new.device) for n, a in self._w.items()}
        if self._cache is not None:
            arrays = tuple(convert(a, target, new.device) for a in self._cache.views())
            new._cache = _Cache(arrays, self._cache.length)
        return new

    def __repr__(self) -> str:
        return (
            f"MultiHeadAttention(emsize={self.emsize}, nhead={self.nhead}, d_k={self.d_k}, d_v={self.d_v}, "
            f"share_kv_across_n_heads={self.share_kv_across_n_heads}, dtype={dtype_name(self.dtype)}, "
            f"xp={namespace_name(self.xp)}, device={self.device})"
        )

    # ------------------------------------------------------------------ forward

    def __call__(
        self,
        x: Any,
        x_kv: Any = None,
        *,
        cache_kv: bool = False,
        add_input: bool = False,
        allow_inplace: bool = False,
        save_peak_mem_factor: int | None = None,
        reuse_first_head_kv: bool = False,
        only_cache_first_head_kv: bool = False,
        use_cached_kv: bool = False,
        training: bool = False,
        q_chunk_size: int | None = None,
        kv_chunk_size: int | None = None,
        append_kv: bool = False,
        memory_budget: int | str | None = None,
        workers: int | None = None,
    ) -> Any:
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
            result into ``x`` in place (needs ``allow_inplace``); the attention
            working-set budget is divided by it too.
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

        Returns
        -------
        array, shape ``[..., T, E]``
            Same namespace, device and dtype as ``x``.
        """
        xp = self.xp
        for name, val in (("cache_kv", cache_kv), ("add_input", add_input), ("allow_inplace", allow_inplace),
                          ("reuse_first_head_kv", reuse_first_head_kv), ("only_cache_first_head_kv", only_cache_first_head_kv),
                          ("use_cached_kv", use_cached_kv), ("training", training), ("append_kv", append_kv)):
            check_bool(val, name)
        factor = check_optional_positive_int(save_peak_mem_factor, "save_peak_mem_factor", minimum=2)
        if cache_kv and use_cached_kv:
            msg = "cache_kv and use_cached_kv cannot both be True: a call either stores new keys/values or uses stored ones"
            raise ValueError(msg)
        if append_kv and not cache_kv:
            msg = "append_kv=True needs cache_kv=True, got cache_kv=False"
            raise ValueError(msg)
        if factor is not None and not allow_inplace:
            msg = f"save_peak_mem_factor={factor} writes results into x and needs allow_inplace=True, got allow_inplace=False"
            raise ValueError(msg)
        if x_kv is x:
            x_kv = None  # the reference treats x_kv identical to x as self-attention

        got = namespace_of(x, x_kv, names=("x", "x_kv"))
        if got is not xp:
            msg = f"x must be an array of the layer's namespace {namespace_name(xp)}, got {namespace_name(got)}; use .to()"
            raise TypeError(msg)
        if device_of(x) != self.device:
            msg = f"x must be on the layer's device {self.device}, got {device_of(x)}; use .to()"
            raise ValueError(msg)
        E = self.emsize
        if x.ndim < 2:
            msg = f"x must have shape [..., seq_len, emsize={E}], got shape {shape_str(x.shape)}"
            raise ValueError(msg)
        check_shape_and_dtype(x, "x", (*x.shape[:-1], E), legend="[..., seq_len, emsize]", dtype=self.dtype, xp=xp)
        if x_kv is not None:
            check_shape_and_dtype(x_kv, "x_kv", (*x.shape[:-2], None, E), legend="[..., kv_len, emsize]", dtype=self.dtype, xp=xp)
        if use_cached_kv:
            if self._cache is None:
                msg = "use_cached_kv=True but the cache is empty; call with cache_kv=True first or pass precomputed keys/values"
                raise ValueError(msg)
            if x_kv is not None:
                msg = "use_cached_kv=True takes keys/values from the cache, so x_kv must be None"
                raise ValueError(msg)
        elif not self._has_kv_weights():
            msg = "this layer has no key/value weights (precomputed keys/values); call it with use_cached_kv=True"
            raise ValueError(msg)
        if reuse_first_head_kv and x_kv is None and not use_cached_kv:
            msg = "reuse_first_head_kv=True is for cross-attention and needs x_kv, got x_kv=None"
            raise ValueError(msg)

        T = x.shape[-2]
        x_flat = xp.reshape(x, (-1, T, E))
        B = x_flat.shape[0]
        kv_flat = None if x_kv is None else xp.reshape(x_kv, (-1, x_kv.shape[-2], E))
        if use_cached_kv and self._cache.arrays[0].shape[0] != B:
            msg = f"x has {B} flattened batch rows but the cache holds {self._cache.arrays[0].shape[0]}"
            raise ValueError(msg)

        seed = None
        if training and self.dropout_p:
            seed = _dropout.derive_seed(self.seed, STREAMS["dropout"], self._calls)
            self._calls += 1
        dropout_p = self.dropout_p if seed is not None else 0.0

        cache_offset = 0
        if cache_kv:
            S_new = T if kv_flat is None else kv_flat.shape[1]
            cache_offset = self._prepare_cache(B, S_new, append_kv, reuse_first_head_kv or only_cache_first_head_kv)

        workers = resolve_workers(workers, xp)
        if factor is not None:
            # The factor splits the attention working set as well as the batch.
            budget = get_memory_budget() if memory_budget is None else parse_memory_budget(memory_budget)
            memory_budget = max(1, budget // factor)

        def part(b0: int, b1: int) -> Any:
            return self._block(x_flat[b0:b1, ...], None if kv_flat is None else kv_flat[b0:b1, ...], b0, b1,
                               cache_kv=cache_kv, append_kv=append_kv, use_cached_kv=use_cached_kv,
                               reuse=reuse_first_head_kv, cache_offset=cache_offset, dropout_p=dropout_p, seed=seed,
                               q_chunk_size=q_chunk_size, kv_chunk_size=kv_chunk_size, memory_budget=memory_budget,
                               workers=workers)

        if factor is None:
            out = part(0, B)
            return xp.reshape(x_flat + out if add_input else out, x.shape)
        step = -(-B // factor)
        for b0 in range(0, B, step):
            b1 = min(B, b0 + step)
            result = part(b0, b1)
            x_flat[b0:b1, ...] = x_flat[b0:b1, ...] + result if add_input else result
        return xp.reshape(x_flat, x.shape)

    def _prepare_cache(self, B: int, S_new: int, append: bool, first_head_only: bool) -> int:
        """Allocate (or grow, with ``append``) the cache for ``S_new`` more rows; return where they start."""
        xp = self.xp
        kh = 1 if first_head_only else self.nhead_kv
        use_kv_layout = self._w["w_kv"] is not None or self._w["w_qkv"] is not None
        shapes = [(B, S_new, 2, kh, self.d_k)] if use_kv_layout else [(B, S_new, kh, self.d_k), (B, S_new, kh, self.d_v)]
        if append and self._cache is not None:
            have = [tuple(a.shape[:1]) + tuple(a.shape[2:]) for a in self._cache.arrays]
            want = [s[:1] + s[2:] for s in shapes]
            if have != want:
                msg = (
                    f"append_kv=True must match the cached layout [batch, *, ...] {have}, got {want} "
                    "(same batch, kv heads and only_cache_first_head_kv/reuse_first_head_kv setting)"
                )
                raise ValueError(msg)
            start = self._cache.length
            self._cache.reserve(S_new, xp=xp)
            self._cache.length += S_new
            return start
        self._cache = None  # free the old cache before allocating the new one
        arrays = tuple(xp.empty(s, dtype=self.dtype, device=self.device) for s in shapes)
        self._cache = _Cache(arrays, S_new)
        return 0

    def _project(self, x: Any, w: Any, shape: tuple[int, ...]) -> Any:
        """``x [b, L, E] @ w.reshape(-1, E).T`` reshaped to ``[b, L, *shape]``."""
        xp = self.xp
        y = xp.matmul(x, xp.matrix_transpose(xp.reshape(w, (-1, self.emsize))))
        return xp.reshape(y, (x.shape[0], x.shape[1], *shape))

    def _block(self, x: Any, x_kv: Any, b0: int, b1: int, *, cache_kv: bool, append_kv: bool, use_cached_kv: bool,
               reuse: bool, cache_offset: int, dropout_p: float, seed: int | None,
               q_chunk_size: Any, kv_chunk_size: Any, memory_budget: Any, workers: int) -> Any:
        """Output ``[b, T, E]`` for flattened batch rows ``b0:b1``."""
        xp = self.xp
        N, K, H, V = self.nhead, self.nhead_kv, self.d_k, self.d_v
        w = self._w
        if use_cached_kv:
            q = self._q(x)
            k, v = self._cache.keys_values(b0, b1)
        elif w["w_qkv"] is not None and x_kv is None:
            qkv = self._project(x, w["w_qkv"], (3, N, H))
            q, k, v = qkv[:, :, 0, ...], qkv[:, :, 1, ...], qkv[:, :, 2, ...]
        else:
            q = self._q(x)
            src = x if x_kv is None else x_kv
            w_kv = w["w_kv"] if w["w_qkv"] is None else w["w_qkv"][1:, ...]
            kh = 1 if reuse else K
            if w_kv is not None:
                kv = self._project(src, w_kv[:, :kh, ...], (2, kh, H))
                k, v = kv[:, :, 0, ...], kv[:, :, 1, ...]
            else:
                k = self._project(src, w["w_k"][:kh, ...], (kh, H))
                v = self._project(src, w["w_v"][:kh, ...], (kh, V))
        if cache_kv:
            self._cache.write(slice(b0, b1), slice(cache_offset, cache_offset + k.shape[1]), k, v)
            if append_kv:
                k, v = self._cache.keys_values(b0, b1)
        scale = self.softmax_scale if self.softmax_scale is not None else check_scale(None, H)
        plan = plan_chunks(
            batch=b1 - b0, q_len=q.shape[1], kv_len=k.shape[1], heads=N, d_k=H, d_v=V,
            compute_itemsize=itemsize(compute_dtype(self.dtype, xp), xp),
            dropout=dropout_p > 0, masked=False, memory_budget=memory_budget,
            q_chunk_size=q_chunk_size, kv_chunk_size=kv_chunk_size, workers=workers,
            on_cpu=is_cpu(xp, self.device),
        )
        heads = attend(q, k, v, xp=xp, scale=scale, plan=plan, dropout_p=dropout_p, seed=seed, batch_offset=b0,
                       workers=workers)
        y = xp.matmul(xp.reshape(heads, (b1 - b0, q.shape[1], N * V)), xp.reshape(w["w_out"], (N * V, self.emsize)))
        return y

    def _q(self, x: Any) -> Any:
        w_q = self._w["w_q"] if self._w["w_q"] is not None else self._w["w_qkv"][:1, ...]
        return self._project(x, w_q, (self.nhead, self.d_k))
