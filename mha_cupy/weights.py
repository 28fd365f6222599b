"""Weight initialisation and conversion from other layouts.

Layouts (letters as in ``mha_cupy.attention``):
``w_qkv [3, N, H, E]``, ``w_q [1, N, H, E]``, ``w_kv [2, K, H, E]``,
``w_k [K, H, E]``, ``w_v [K, V, E]``, ``w_out [N, V, E]``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any
from collections.abc import Callable

from ._backends import Backend, backend_of, convert, device_of, resolve_backend, same_device
from ._random import STREAMS, uniform
from ._validation import (check_bool, check_positive_int, check_shape_and_dtype, check_weight_combination,
                          keyword_hints, shape_str)

#: The public names; ``Weights``, ``checked_weights`` and the initialisers are the layer's machinery.
__all__ = ["WEIGHT_NAMES", "input_weight_bound", "output_weight_bound",
           "convert_torch_nn_multihead_attention_state_dict"]

#: The weight arrays a layer may have, in the order the reference lists them.
WEIGHT_NAMES = ("w_out", "w_q", "w_k", "w_v", "w_kv", "w_qkv")


@dataclasses.dataclass(frozen=True)
class Weights:
    """A layer's weights in the reference's layouts (module docstring), None for those it does not have, and
    the one place that knows how queries, keys and values are read from them."""

    w_out: Any
    w_q: Any = None
    w_k: Any = None
    w_v: Any = None
    w_kv: Any = None
    w_qkv: Any = None

    def present(self) -> dict[str, Any]:
        """Name to array for the weights the layer has, in ``WEIGHT_NAMES`` order."""
        return {n: getattr(self, n) for n in WEIGHT_NAMES if getattr(self, n) is not None}

    def map(self, fn: Callable[[Any], Any]) -> Weights:
        """The same layout with ``fn`` applied to every array (to another library or device)."""
        return Weights(**{n: fn(a) for n, a in self.present().items()})

    @property
    def has_kv(self) -> bool:
        """Whether keys and values can be projected (else they come precomputed, from the cache)."""
        return self.w_qkv is not None or self.w_kv is not None or self.w_k is not None

    @property
    def stacked_kv(self) -> bool:
        """Whether keys and values are projected by one stacked weight (``w_kv``, or ``w_qkv``'s last two thirds)."""
        return self.w_qkv is not None or self.w_kv is not None

    def query(self) -> Any:
        """The query projection ``[1, N, H, E]``."""
        return self.w_q if self.w_q is not None else self.w_qkv[:1, ...]

    def key_value(self, heads: int) -> tuple[Any, Any, Any]:
        """The first ``heads`` kv heads' projections: ``(w_kv [2, heads, H, E], None, None)`` when stacked,
        else ``(None, w_k [heads, H, E], w_v [heads, V, E])``."""
        if self.stacked_kv:
            w_kv = self.w_kv if self.w_qkv is None else self.w_qkv[1:, ...]
            return w_kv[:, :heads, ...], None, None
        return None, self.w_k[:heads, ...], self.w_v[:heads, ...]




def checked_weights(given: dict[str, Any], *, sizes: tuple[int, int, int, int, int], dtype: Any, be: Backend,
                    device: Any) -> Weights:
    """The weights of ``set_parameters`` (``given``: the weights and precomputed keys/values by name) checked
    against a layer of ``sizes`` ``(N, K, H, V, E)``, namespace ``be``, ``device`` and ``dtype``."""
    if given["w_out"] is None:
        msg = "w_out is required, got None"
        raise ValueError(msg)
    found = backend_of(*given.values(), names=tuple(given))
    if found.xp is not be.xp:
        msg = (f"weights must be arrays of the layer's namespace {be.name}, got {found.name}: convert them "
               f"(convert_torch_nn_multihead_attention_state_dict(..., xp={be.name!r})), or move the layer to "
               f"theirs first (layer.to({found.name!r}))")
        raise TypeError(msg)
    for name, a in given.items():
        if a is not None and not same_device(device_of(a), device):
            msg = f"{name} must be on the layer's device {device}, got {device_of(a)}"
            raise ValueError(msg)
    N, K, H, V, E = sizes
    check_weight_combination(given, nhead=N, kv_heads=K, d_k=H, d_v=V)
    for name, shape in (("w_out", (N, V, E)), ("w_q", (1, N, H, E)), ("w_k", (K, H, E)), ("w_v", (K, V, E)),
                        ("w_kv", (2, K, H, E)), ("w_qkv", (3, N, H, E))):
        if given[name] is not None:
            check_shape_and_dtype(given[name], name, shape, dtype=dtype, be=be)
    return Weights(**{n: given[n] for n in WEIGHT_NAMES})


def input_weight_bound(nhead: int, d: int, emsize: int, gain: float) -> float:
    """TabPFN's bound for input projections: ``sqrt(3) * gain * sqrt(2 / (nhead * d + emsize))``.

    ``nhead`` is the number of query heads also for key/value weights, as in the reference.
    """
    return math.sqrt(3.0) * math.sqrt(2.0 / float(nhead * d + emsize)) * gain


def output_weight_bound(nhead: int, d_v: int, emsize: int) -> float:
    """Xavier-uniform bound of ``w_out [N, V, E]`` as torch computes fans for a 3-D tensor.

    ``fan_in = V * E``, ``fan_out = N * E``; bound ``sqrt(6 / (fan_in + fan_out))``.
    """
    return math.sqrt(6.0 / float(d_v * emsize + nhead * emsize))


def init_uniform(
    shape: tuple[int, ...], bound: float, *, seed: int, name: str, dtype: Any, xp: Any, device: Any
) -> Any:
    """Uniform weights in ``[-bound, bound)`` from the Philox stream of ``name`` under ``seed``."""
    u = uniform(seed, STREAMS[name], shape, dtype, xp=xp, device=device)
    return xp.astype((u * 2.0 - 1.0) * bound, dtype)


def initial_weights(sizes: tuple[int, int, int, int, int], *, gain: float, seed: int, dtype: Any, xp: Any, device: Any,
                    with_kv: bool, zero_output: bool) -> dict[str, Any]:
    """A new layer's weights in the reference's layouts, from the Philox streams of ``seed``.

    ``sizes`` is ``(N, K, H, V, E)``. ``w_qkv`` when ``d_k == d_v``, ``K == N``
    and the layer has key/value weights (``with_kv``); else ``w_q`` with
    ``w_kv`` or ``w_k``/``w_v`` (or none, for precomputed keys/values).
    ``w_out`` is Xavier-uniform, or zero. The draws are made in float64 for float64, else in float32 (rounded
    once to ``dtype``), on NumPy for devices in host memory and on the device otherwise; the same numbers on every
    library.
    """
    N, K, H, V, E = sizes
    be = resolve_backend(xp)
    # Host memory: drawn on NumPy, the fastest there (JAX would compile Philox's hundred small operations for
    # every new weight shape, torch's integer operations are slower); accelerators draw where they are.
    draw = resolve_backend("numpy") if be.is_cpu(device) else be
    wide = getattr(draw.xp, be.dtype_name(be.compute_dtype(dtype)))

    def init(name: str, shape: tuple[int, ...], bound: float) -> Any:
        w = init_uniform(shape, bound, seed=seed, name=name, dtype=wide, xp=draw.xp,
                         device=None if draw is not be else device)
        w = convert(w, be, device)
        return be.xp.astype(w, dtype, copy=False)  # float16, bfloat16: rounded once

    if zero_output:
        weights = {"w_out": xp.zeros((N, V, E), dtype=dtype, device=device)}
    else:
        weights = {"w_out": init("w_out", (N, V, E), output_weight_bound(N, V, E))}
    if H == V and K == N and with_kv:
        weights["w_qkv"] = init("w_qkv", (3, N, H, E), input_weight_bound(N, H, E, gain))
        return weights
    weights["w_q"] = init("w_q", (1, N, H, E), input_weight_bound(N, H, E, gain))
    if with_kv and H == V:
        weights["w_kv"] = init("w_kv", (2, K, H, E), input_weight_bound(N, H, E, gain))
    elif with_kv:
        weights["w_k"] = init("w_k", (K, H, E), input_weight_bound(N, H, E, gain))
        weights["w_v"] = init("w_v", (K, V, E), input_weight_bound(N, V, E, gain))
    return weights


@keyword_hints
def convert_torch_nn_multihead_attention_state_dict(
    state_dict: dict,
    nhead: int,
    *,
    disable_stacked_w_qkv: bool = False,
    xp: Any = None,
    device: Any = None,
) -> dict[str, Any]:
    """Keyword arguments for ``MultiHeadAttention.set_parameters`` from a ``torch.nn.MultiheadAttention`` state dict.

    Parameters
    ----------
    state_dict : dict
        Holds ``in_proj_weight [3 E, E]`` and ``out_proj.weight [E, E]`` as
        arrays of any library (torch tensors included). Bias entries must be
        absent or all zero: this attention has no biases, and dropping
        non-zero ones would change the results silently.
    nhead : int
        Number of heads; must divide ``E``.
    disable_stacked_w_qkv : bool
        Return ``w_q [1, N, H, E]`` and ``w_kv [2, N, H, E]`` instead of
        ``w_qkv [3, N, H, E]``.
    xp, device : optional
        Namespace (module or name) and device of the returned arrays; default
        those of ``in_proj_weight``.

    Returns
    -------
    dict
        ``{"w_qkv", "w_out"}`` or ``{"w_q", "w_kv", "w_out"}``, with
        ``w_out [N, H, E]``.

    Examples
    --------
    >>> import torch
    >>> import mha_cupy
    >>> _ = torch.manual_seed(0)
    >>> nn = torch.nn.MultiheadAttention(64, 4, bias=False, batch_first=True, dtype=torch.float64)
    >>> weights = mha_cupy.convert_torch_nn_multihead_attention_state_dict(nn.state_dict(), 4, xp="numpy")
    >>> {name: w.shape for name, w in weights.items()}
    {'w_qkv': (3, 4, 16, 64), 'w_out': (4, 16, 64)}
    >>> layer = mha_cupy.MultiHeadAttention(emsize=64, nhead=4, d_k=16, d_v=16, dtype="float64")
    >>> layer.set_parameters(**weights)
    >>> x = torch.randn(2, 10, 64, dtype=torch.float64)
    >>> with torch.no_grad():
    ...     expected = nn(x, x, x, need_weights=False)[0]
    >>> mha_cupy.compare(layer(x.numpy()), expected).ok
    True
    """
    nhead = check_positive_int(nhead, "nhead")
    check_bool(disable_stacked_w_qkv, "disable_stacked_w_qkv")
    source, w_in, w_o = _checked_state_dict(state_dict, nhead)
    src, E = source.xp, w_in.shape[1]
    d = E // nhead
    w_in = src.reshape(w_in, (3, nhead, d, E))
    w_out = src.reshape(src.matrix_transpose(w_o), (nhead, d, E))
    if disable_stacked_w_qkv:
        out = {"w_q": w_in[:1, ...], "w_kv": w_in[1:, ...], "w_out": w_out}
    else:
        out = {"w_qkv": w_in, "w_out": w_out}
    target = source if xp is None else resolve_backend(xp)
    device = None if device is None else target.check_device(device)
    # Contiguous copies: the results become the module's own parameters.
    if target is source and device is None:
        return {k: src.asarray(v, copy=True) for k, v in out.items()}
    return {k: convert(v, target, device) for k, v in out.items()}


def _detached(a: Any) -> Any:
    """torch parameters' values without their autograd graph; other arrays as they are."""
    return a.detach() if hasattr(a, "detach") else a


def _checked_state_dict(state_dict: Any, nhead: int) -> tuple[Any, Any, Any]:
    """The backend, ``in_proj_weight [3 E, E]`` and ``out_proj.weight [E, E]`` of a state dict this layout can
    represent; a ValueError/TypeError naming what cannot be converted."""
    if not isinstance(state_dict, dict):
        msg = f"state_dict must be a dict, got {type(state_dict).__name__}"
        raise TypeError(msg)
    for key in ("in_proj_weight", "out_proj.weight"):
        if key not in state_dict:
            msg = (f"state_dict must hold {key!r} (a torch.nn.MultiheadAttention with equal q/k/v sizes), "
                   f"got keys {sorted(state_dict)}")
            raise ValueError(msg)
    for key in ("q_proj_weight", "k_proj_weight", "v_proj_weight", "bias_k", "bias_v"):
        if state_dict.get(key) is not None:
            msg = f"state_dict holds {key!r}, which this layout cannot represent (only in_proj_weight/out_proj.weight)"
            raise ValueError(msg)
    w_in, w_o = state_dict["in_proj_weight"], state_dict["out_proj.weight"]
    source = backend_of(w_in, w_o, names=("in_proj_weight", "out_proj.weight"))
    w_in, w_o = _detached(w_in), _detached(w_o)
    if w_in.ndim != 2 or w_in.shape[0] != 3 * w_in.shape[1]:
        msg = f"in_proj_weight must have shape [3 * emsize, emsize], got {shape_str(w_in.shape)}"
        raise ValueError(msg)
    E = w_in.shape[1]
    if E % nhead:
        msg = f"emsize must be divisible by nhead: emsize {E}, got nhead {nhead}"
        raise ValueError(msg)
    if tuple(w_o.shape) != (E, E):
        msg = f"out_proj.weight must have shape {shape_str((E, E))}, got {shape_str(w_o.shape)}"
        raise ValueError(msg)
    for key in ("in_proj_bias", "out_proj.bias"):
        b = state_dict.get(key)
        if b is not None and bool(source.xp.any(_detached(b) != 0)):
            msg = f"state_dict[{key!r}] is non-zero; this attention has no biases, so converting would change results"
            raise ValueError(msg)
    return source, w_in, w_o
