"""Every argument check of the package, in one place.

Each message names the argument, what was expected and what came. Nothing
here changes state: callers run every check before they touch a cache, a
weight or a random stream.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import numbers
import operator
from typing import Any, TypeVar
from collections.abc import Callable, Sequence

from ._backends import Backend, device_of

__all__ = [
    "keyword_hints",
    "check_keywords",
    "shape_str",
    "check_shape_and_dtype",
    "check_dtype",
    "check_positive_int",
    "check_optional_positive_int",
    "check_probability",
    "check_int_in",
    "check_seed",
    "check_array",
    "check_bool",
    "check_finite_real",
    "check_scale",
    "check_mask",
    "check_quantized",
    "check_lengths",
    "check_window",
    "check_softcap",
    "check_precomputed_combination",
    "check_weight_combination",
]


_F = TypeVar("_F", bound=Callable[..., Any])


def keyword_hints(fn: _F) -> _F:
    """``fn`` with a TypeError for a misspelt keyword argument that names the closest parameter (``difflib``),
    instead of Python's bare "unexpected keyword argument"; every other check is left to ``fn``."""
    names = [n for n in inspect.signature(fn).parameters if n != "self"]

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        check_keywords(kwargs, names, where=f"{fn.__qualname__}()")
        return fn(*args, **kwargs)

    return checked  # type: ignore[return-value]


def check_keywords(given: Any, known: Sequence[str], *, where: str) -> None:
    """Every name in ``given`` must be one of ``known``; otherwise a TypeError naming it, ``where`` it was given and
    the closest known name (``difflib``), or all of them when none is close."""
    for name in given:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; the keywords are {', '.join(known)}"
            msg = f"{where} got an unexpected keyword argument {name!r}{hint}"
            raise TypeError(msg)


def shape_str(shape: Sequence[Any]) -> str:
    """``[2, 4, 32]`` for a shape tuple; ``None`` entries print as ``*``."""
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def check_shape_and_dtype(
    x: Any,
    name: str,
    expected: Sequence[int | None],
    *,
    legend: str | None = None,
    dtype: Any = None,
    be: Backend,
    hint: str = "",
) -> None:
    """Check that ``x`` has exactly ``len(expected)`` dimensions matching ``expected``.

    ``None`` in ``expected`` accepts any size. ``legend`` names the axes for the
    message (e.g. ``"[batch, q_len, heads, d_k]"``). ``dtype``, when given, must
    equal ``x.dtype``; ``False`` leaves the dtype to the caller; otherwise ``x`` must be of a real floating dtype
    of ``be``.
    """
    shape = tuple(x.shape)
    axes = f" {legend}" if legend else ""
    if len(shape) != len(expected):
        msg = (f"{name} must have {len(expected)} dimensions{axes}, shape {shape_str(expected)}, "
               f"got shape {shape_str(shape)}")
        raise ValueError(msg)
    for got, want in zip(shape, expected):
        if want is not None and got != want:
            msg = f"{name} must have shape {shape_str(expected)}{axes}, got shape {shape_str(shape)}"
            raise ValueError(msg)
    if dtype is not False:
        check_dtype(x, name, dtype, be=be, hint=hint)


def check_dtype(x: Any, name: str, dtype: Any = None, *, be: Backend, hint: str = "") -> None:
    """``x.dtype`` must equal ``dtype`` (or be real floating when ``dtype`` is None); ``hint`` (with ``{got}`` for
    the floating dtype that came) says what to do instead."""
    if dtype is not None:
        if x.dtype != dtype:
            got = be.dtype_name(x.dtype)
            floating = be.xp.isdtype(x.dtype, "real floating")  # a hint to adopt the dtype that came fits floats only
            todo = hint.format(got=got) if hint and floating else f"cast {name} to {be.dtype_name(dtype)}"
            msg = f"{name} must have dtype {be.dtype_name(dtype)}, got {got} (no implicit casts): {todo}"
            raise TypeError(msg)
    elif not be.xp.isdtype(x.dtype, "real floating"):
        msg = f"{name} must have a real floating dtype, got {be.dtype_name(x.dtype)}"
        raise TypeError(msg)


def _as_int(value: Any, name: str, expected: str) -> int:
    """``value`` as a Python int: any integral scalar (``operator.index``), never a bool."""
    if isinstance(value, bool):
        msg = f"{name} must be {expected}, got bool {value!r}"
        raise TypeError(msg)
    try:
        return operator.index(value)
    except TypeError:
        msg = f"{name} must be {expected}, got {type(value).__name__} {value!r}"
        raise TypeError(msg) from None


def _as_float(value: Any, name: str, expected: str) -> float:
    """``value`` as a finite Python float: any real scalar (``numbers.Real``), never a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        msg = f"{name} must be {expected}, got {type(value).__name__} {value!r}"
        raise TypeError(msg)
    try:
        result = float(value)
    except OverflowError:
        result = math.inf
    if not math.isfinite(result):
        msg = f"{name} must be {expected}, got {value!r}"
        raise ValueError(msg)
    return result


def check_positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    """``value`` must be an integral scalar (not bool) ``>= minimum``; returned as a Python int."""
    result = _as_int(value, name, f"an int >= {minimum}")
    if result < minimum:
        msg = f"{name} must be an int >= {minimum}, got {result}"
        raise ValueError(msg)
    return result


def check_optional_positive_int(value: Any, name: str, *, minimum: int = 1) -> int | None:
    """Like ``check_positive_int`` but ``None`` passes."""
    return None if value is None else check_positive_int(value, name, minimum=minimum)


def check_int_in(value: Any, name: str, low: int, high: int, text: str) -> int:
    """``value`` must be an integral scalar in ``[low, high)`` (``text`` spells the range for messages)."""
    result = _as_int(value, name, f"an int in {text}")
    if not low <= result < high:
        msg = f"{name} must be an int in {text}, got {result}"
        raise ValueError(msg)
    return result


def check_seed(value: Any, name: str = "seed") -> int:
    """A 64-bit seed: an integral scalar in ``[0, 2**64)``."""
    return check_int_in(value, name, 0, 2**64, "[0, 2**64)")


def check_probability(value: Any, name: str) -> float:
    """``value`` must be a real number in ``[0, 1]``."""
    result = _as_float(value, name, "a float in [0, 1]")
    if not 0.0 <= result <= 1.0:
        msg = f"{name} must be a float in [0, 1], got {value}"
        raise ValueError(msg)
    return result


def check_bool(value: Any, name: str) -> bool:
    """``value`` must be a Python bool."""
    if not isinstance(value, bool):
        msg = f"{name} must be a bool, got {type(value).__name__} {value!r}"
        raise TypeError(msg)
    return value


def check_finite_real(value: Any, name: str) -> float:
    """``value`` must be a finite real number (not bool)."""
    return _as_float(value, name, "a finite float")


def check_array(value: Any, name: str) -> None:
    """A required array argument must not be None (other non-arrays are refused by ``backend_of``), and
    its shape must be known (lazy libraries may leave sizes unknown: None, or NaN in Dask)."""
    if value is None:
        msg = f"{name} must be an array, got None"
        raise TypeError(msg)
    shape = getattr(value, "shape", ())
    if any(n is None or n != n for n in shape):
        msg = (f"{name} must have a known shape, got {tuple(shape)}; compute the sizes first "
               f"(Dask: {name}.compute_chunk_sizes())")
        raise ValueError(msg)


def check_scale(scale: Any, d_k: int, name: str = "scale") -> float:
    """The logit scale: ``scale`` if given (a finite real number), else ``1 / sqrt(d_k)``."""
    if scale is None:
        return 1.0 / math.sqrt(d_k) if d_k else 1.0
    return _as_float(scale, name, "a finite float or None")


def check_mask(x: Any, name: str, full: tuple[int, int, int, int], *, be: Backend, dtype: Any = None) -> Any:
    """Validate a mask (bool) or bias (``dtype``) broadcastable to ``full`` = ``[B, T, N, S]``; return it as 4-D."""
    if x is None:
        return None
    xp = be.xp
    if dtype is None and x.dtype != xp.bool:
        msg = f"{name} must be a bool array (True = attend), got dtype {be.dtype_name(x.dtype)}"
        raise TypeError(msg)
    if dtype is not None and x.dtype != dtype:
        msg = f"{name} must have the dtype of q ({be.dtype_name(dtype)}), got {be.dtype_name(x.dtype)}"
        raise TypeError(msg)
    shape = tuple(x.shape)
    if len(shape) > 4 or any(s not in (1, f) for s, f in zip(shape[::-1], full[::-1])):
        torch_like = len(shape) == 2 and shape == (full[1], full[3])  # torch's [q_len, kv_len]
        hint = f"; a [q_len, kv_len] {name} (torch's layout) is {name}[None, :, None, :] here" if torch_like else ""
        msg = (f"{name} must broadcast to [batch, q_len, heads, kv_len] = {shape_str(full)}, got shape "
               f"{shape_str(shape)}{hint}")
        raise ValueError(msg)
    return xp.reshape(x, (1,) * (4 - len(shape)) + shape)


def check_quantized(x: Any, name: str, scale: Any, *, batch: int, dtype: Any, be: Backend) -> Any:
    """Keys or values ``x`` stored quantized, read as ``x * scale`` (TabPFN 9's ``QuantizedKVCacheEntry``).

    Without a scale, ``x`` must have ``dtype`` (that of q). With one, ``x``
    must have a quantized dtype (``be.quantized_dtypes()``: int8, float8_e4m3fn)
    and ``scale`` be a finite real number, or a finite floating array of shape
    ``[]``, ``[n]`` or ``[n, 1, 1, 1]`` with ``n`` 1 or ``batch`` (one scale
    per batch row). Returns the scale as ``[n, 1, 1, 1]`` in ``dtype`` on
    ``x``'s device (dequantizing multiplies in q's dtype, as TabPFN does), or None.
    """
    quantized = be.quantized_dtypes()
    scale_name = f"{name}_scale"
    is_quantized = any(x.dtype == d for d in quantized.values())
    if scale is None:
        if is_quantized:
            msg = (
                f"{name} has the quantized dtype {be.dtype_name(x.dtype)}: pass its dequantization scale as "
                f"{scale_name}= ({name} * {scale_name} are the real values), or cast {name} to {be.dtype_name(dtype)}"
            )
            raise TypeError(msg)
        check_dtype(x, name, dtype, be=be)
        return None
    if not is_quantized:
        msg = (f"{name} must have a quantized dtype {sorted(quantized)} of {be.name} when {scale_name} is given, "
               f"got {be.dtype_name(x.dtype)}; drop {scale_name} for unquantized {name}")
        raise TypeError(msg)
    xp = be.xp
    if isinstance(scale, numbers.Real) or not be.is_array(scale):
        value = _as_float(scale, scale_name, "a finite float or a floating array of one scale per batch row")
        return xp.full((1, 1, 1, 1), value, dtype=dtype, device=device_of(x))
    shape = tuple(scale.shape)
    n = shape[0] if shape else 1
    if shape not in ((), (n,), (n, 1, 1, 1)) or n not in (1, batch):
        msg = (f"{scale_name} must have shape [], [n] or [n, 1, 1, 1] with n 1 or the batch {batch}, "
               f"got {shape_str(shape)}")
        raise ValueError(msg)
    if not xp.isdtype(scale.dtype, "real floating"):
        msg = f"{scale_name} must have a real floating dtype, got {be.dtype_name(scale.dtype)}"
        raise TypeError(msg)
    if not be.lazy_blocks and not be.traced(scale) and not bool(xp.all(xp.isfinite(scale))):
        msg = f"{scale_name} must be finite, got non-finite values"
        raise ValueError(msg)
    scale = xp.reshape(scale, (n, 1, 1, 1))
    return xp.astype(scale, dtype, copy=False)


def check_lengths(x: Any, name: str, batch: int, limit: int, axis: str, *, be: Backend) -> tuple[int, ...] | None:
    """Row lengths ``x``: None, or an integer array ``[batch]`` of ``be`` with values in ``[0, limit]``; returned
    as Python ints (one small copy to the host: the loop decides from them which chunks to skip)."""
    if x is None:
        return None
    if not be.is_array(x):
        msg = f"{name} must be an integer array [batch] = [{batch}] or None, got {type(x).__name__}"
        raise TypeError(msg)
    if tuple(x.shape) != (batch,):
        msg = f"{name} must have shape [batch] = [{batch}], got shape {shape_str(tuple(x.shape))}"
        raise ValueError(msg)
    if not be.xp.isdtype(x.dtype, "integral"):
        msg = f"{name} must have an integer dtype, got {be.dtype_name(x.dtype)}"
        raise TypeError(msg)
    if be.traced(x):
        msg = (f"{name} must have values known when the call is planned (they decide which chunks run), got a traced "
               f"array inside jax.jit; close over the lengths or pass them from outside the jitted function")
        raise TypeError(msg)
    values = tuple(int(n) for n in be.to_numpy(x).tolist())
    bad = [n for n in values if not 0 <= n <= limit]
    if bad:
        msg = f"{name} must lie in [0, {axis}] = [0, {limit}], got {bad[0]} (row {values.index(bad[0])})"
        raise ValueError(msg)
    return values


def check_window(value: Any, name: str = "local_window_size") -> tuple[int, int] | None:
    """A sliding window: None, an int ``w >= 0`` (``(w, w)``) or a pair ``(left, right)`` of ints ``>= 0``."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            msg = f"{name} must be an int or a pair (left, right), got {len(value)} values {tuple(value)!r}"
            raise ValueError(msg)
        return (check_positive_int(value[0], f"{name}[0] (left)", minimum=0),
                check_positive_int(value[1], f"{name}[1] (right)", minimum=0))
    w = check_positive_int(value, name, minimum=0)
    return w, w


def check_softcap(value: Any, name: str = "softcap") -> float | None:
    """Logit soft-capping: None or a positive finite float."""
    if value is None:
        return None
    result = _as_float(value, name, "a positive finite float or None")
    if result <= 0:
        msg = f"{name} must be a positive finite float or None, got {value!r}"
        raise ValueError(msg)
    return result


def check_precomputed_combination(precomputed_k: Any, precomputed_v: Any, precomputed_kv: Any) -> None:
    """Precomputed keys/values come as ``precomputed_kv`` or as ``precomputed_k`` with ``precomputed_v``."""
    if precomputed_k is not None and precomputed_kv is not None:
        msg = "pass precomputed_kv or precomputed_k/precomputed_v, got both"
        raise ValueError(msg)
    if (precomputed_k is None) != (precomputed_v is None):
        msg = "precomputed_k and precomputed_v come together, got only one of them"
        raise ValueError(msg)


def check_weight_combination(given: dict[str, Any], *, nhead: int, kv_heads: int, d_k: int, d_v: int) -> None:
    """The rules of ``set_parameters``: which weights (and precomputed keys/values) may come together (``w_out``,
    always required, is checked first by the caller)."""
    present = sorted(n for n, a in given.items() if a is not None)

    def rule(ok: bool, text: str) -> None:
        if not ok:
            msg = f"set_parameters: {text}; got {present}"
            raise ValueError(msg)

    check_precomputed_combination(given["precomputed_k"], given["precomputed_v"], given["precomputed_kv"])
    w_qkv, w_q, w_kv, w_k, w_v = (given[n] for n in ("w_qkv", "w_q", "w_kv", "w_k", "w_v"))
    has_pre = given["precomputed_kv"] is not None or given["precomputed_k"] is not None
    has_kv_weights = any(a is not None for a in (w_qkv, w_kv, w_k, w_v))
    rule(has_pre != has_kv_weights, "give key/value weights or precomputed keys/values, exactly one of the two")
    rule((w_qkv is None) != (w_q is None), "give exactly one of w_qkv and w_q")
    rule(w_qkv is None or (w_kv is None and w_k is None and w_v is None), "w_qkv excludes w_kv, w_k and w_v")
    rule(w_kv is None or (w_k is None and w_v is None), "w_kv excludes w_k and w_v")
    rule((w_k is None) == (w_v is None), "w_k and w_v come together")
    if (w_qkv is not None or w_kv is not None) and d_k != d_v:
        msg = f"w_qkv/w_kv need d_k == d_v, got d_k {d_k} and d_v {d_v}; use w_k and w_v"
        raise ValueError(msg)
    if w_qkv is not None and kv_heads != nhead:
        msg = f"w_qkv needs as many kv heads as heads, got nhead {nhead} and kv heads {kv_heads}; use w_q with w_kv"
        raise ValueError(msg)
