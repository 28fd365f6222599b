"""Test helpers: backends, an ``assert_matches_reference`` that checks namespace and dtype, and
an independent float64 attention written with NumPy for parity checks."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from mha_cupy._backends import backend_of, convert, device_of, dtype_name, resolve_backend, to_numpy
from mha_cupy.testing import scaled_error, tolerance

BACKEND_IDS = ("numpy", "array_api_strict", "array_api_strict-device1", "torch", "jax", "cupy", "torch-cuda", "jax-gpu")
#: The cases that need a GPU (the ``gpu`` marker): they skip, with the reason, where none is usable.
GPU_BACKEND_IDS = ("cupy", "torch-cuda", "jax-gpu")


@dataclass
class BackendCase:
    """A library under test: its namespace, a device, and ``asarray`` to bring NumPy test data there."""

    name: str
    xp: Any
    device: Any

    @property
    def adapter(self) -> Any:
        return resolve_backend(self.xp)

    def asarray(self, a: Any, dtype: Any = None) -> Any:
        a = np.array(a, copy=True)  # a fresh host copy: nothing here aliases the caller's data
        if dtype is not None:
            a = a.astype(dtype if isinstance(dtype, str) else dtype_name(dtype))
        return convert(a, self.adapter, self.device)

    def dtype(self, name: str) -> Any:
        return getattr(self.xp, name)


def require(module: str, reason: str | None = None) -> Any:
    """Import an optional test dependency: skip with ``reason`` when absent, or fail where
    ``MHA_CUPY_REQUIRE_ALL_BACKENDS`` is set (CI installs every optional package)."""
    if os.environ.get("MHA_CUPY_REQUIRE_ALL_BACKENDS"):
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=reason or f"needs {module}")


def cupy_skip_reason() -> str | None:
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install cupy-cuda12x)"
    try:
        if not cupy.is_available():
            return "CuPy is installed but finds no CUDA device (cupy.is_available() is False)"
    except Exception as exc:  # noqa: BLE001
        return f"CuPy finds no CUDA device ({exc})"
    return None


def gpu_skip_reason(name: str) -> str | None:
    """Why GPU case ``name`` (one of ``GPU_BACKEND_IDS``) cannot run here, or None when it can."""
    if name == "cupy":
        return cupy_skip_reason()
    lib = name.split("-")[0]
    try:
        module = importlib.import_module(lib)
    except ImportError:
        return f"{lib} is not installed"
    if lib == "torch":
        if not module.cuda.is_available():
            return "torch finds no CUDA device (torch.cuda.is_available() is False)"
        return None
    try:
        module.devices("gpu")
    except RuntimeError as exc:
        return f"JAX finds no GPU (jax.devices('gpu'): {str(exc).splitlines()[0]})"
    return None


def _gpu_device(name: str) -> Any:
    if name == "torch-cuda":
        import torch

        return torch.device("cuda", 0)
    import jax

    return jax.devices("gpu")[0]


def make_backend(name: str) -> BackendCase:
    if name in GPU_BACKEND_IDS:
        reason = gpu_skip_reason(name)
        if reason:
            pytest.skip(reason)
    lib = name.split("-")[0]
    if lib != "cupy":
        try:
            importlib.import_module(lib)
        except ImportError:
            if os.environ.get("MHA_CUPY_REQUIRE_ALL_BACKENDS"):
                raise
            pytest.skip(f"{lib} is not installed")
    adapter = resolve_backend(lib)
    if name == "array_api_strict-device1":
        return BackendCase(name, adapter.xp, adapter.xp.Device("device1"))
    if name in ("torch-cuda", "jax-gpu"):
        return BackendCase(name, adapter.xp, _gpu_device(name))
    return BackendCase(name, adapter.xp, adapter.default_device())


def assert_matches_reference(actual: Any, expected: Any, *, xp: Any, dtype: Any, device: Any = None, what: str = "result",
                 tol: float | None = None) -> float:
    """``actual`` is an array of ``xp`` with ``dtype`` (and ``device``) within the tolerance of ``expected``.

    ``expected`` is a host array (float64 from the reference or a direct computation): it is
    compared without being rounded to ``dtype`` first, unlike ``mha_cupy.testing.assert_close``.
    """
    got = backend_of(actual, names=("actual",))
    assert got.xp is xp, f"{what}: namespace {got.name}, expected {resolve_backend(xp).name}"
    assert actual.dtype == dtype, f"{what}: dtype {dtype_name(actual.dtype)}, expected {dtype_name(dtype)}"
    if device is not None:
        assert device_of(actual) == device, f"{what}: device {device_of(actual)}, expected {device}"
    err = scaled_error(actual, expected)
    limit = tolerance(dtype) if tol is None else tol
    assert err <= limit, f"{what}: scaled max abs error {err:.3e} > {limit:.1e}"
    return err


def visible(B, T, S, *, is_causal=False, q_lengths=None, kv_lengths=None, window=None):
    """``[B, T, S]``: whether query t of row b may see key s, from row lengths, causal and window, written out
    directly: query t of row b sits at key position ``t + kv_len[b] - q_len[b]``."""
    ql = np.full(B, T) if q_lengths is None else np.asarray(to_numpy(q_lengths)).astype(np.int64)
    kl = np.full(B, S) if kv_lengths is None else np.asarray(to_numpy(kv_lengths)).astype(np.int64)
    t, s = np.arange(T)[None, :, None], np.arange(S)[None, None, :]
    pos = t + (kl - ql)[:, None, None]
    ok = (t < ql[:, None, None]) & (s < kl[:, None, None])
    if is_causal:
        ok = ok & (s <= pos)
    if window is not None:
        left, right = (window, window) if isinstance(window, int) else window
        ok = ok & (s >= pos - left) & (s <= pos + right)
    return ok


def naive_attention(q, k, v, *, scale=None, mask=None, bias=None, is_causal=False, keep=None, dropout_p=0.0,
                    q_lengths=None, kv_lengths=None, window=None, softcap=None):
    """Direct float64 attention for ``q [B,T,N,H]``, ``k [B,S,K,H]``, ``v [B,S,K,V]`` (repeats kv heads).

    ``keep`` is a ``[B,N,T,S]`` boolean dropout mask. Fully masked rows give 0. ``softcap`` caps the scaled
    logits before the bias; lengths and windows as in ``visible``.
    """
    q, k, v = (np.asarray(to_numpy(a), dtype=np.float64) for a in (q, k, v))
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    if T == 0 or S == 0:  # no query, or no visible key: zeros
        return np.zeros((B, T, N, v.shape[3]))
    G = N // K
    k = np.repeat(k, G, axis=2)
    v = np.repeat(v, G, axis=2)
    scale = 1.0 / np.sqrt(H) if scale is None else scale
    logits = np.einsum("bthd,bshd->bhts", q, k) * scale
    if softcap is not None:
        logits = softcap * np.tanh(logits / softcap)
    allowed = np.broadcast_to(visible(B, T, S, is_causal=is_causal, q_lengths=q_lengths, kv_lengths=kv_lengths,
                                      window=window)[:, None], (B, N, T, S)).copy()
    if mask is not None:
        allowed &= np.broadcast_to(np.moveaxis(np.asarray(to_numpy(mask)).reshape((1,) * (4 - np.ndim(to_numpy(mask))) + np.shape(to_numpy(mask))), 2, 1), (B, N, T, S))
    if bias is not None:
        b = np.asarray(to_numpy(bias), dtype=np.float64)
        b = b.reshape((1,) * (4 - b.ndim) + b.shape)
        logits = logits + np.moveaxis(b, 2, 1)
    logits = np.where(allowed, logits, -np.inf)
    mx = logits.max(axis=-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    p = np.exp(logits - mx)
    denom = p.sum(axis=-1, keepdims=True)
    p = p / np.where(denom == 0, 1.0, denom)
    if keep is not None:
        p = np.where(keep, p, 0.0) / (1.0 - dropout_p)
    return np.einsum("bhts,bshd->bthd", p, v)


def keep_mask(seed: int, p: float, B: int, N: int, T: int, S: int) -> np.ndarray:
    """The documented dropout keep mask ``[B, N, T, S]``: Philox word 0 at counter (s, t, n, b) >= round(p 2**32).

    Computed on NumPy's uint64 lanes, whose Philox is checked against Random123's known answers and an
    independent pure-Python Philox in ``test_dropout.py``."""
    from mha_cupy import dropout as D

    b, h, i, j = np.meshgrid(*(np.arange(n, dtype=np.uint64) for n in (B, N, T, S)), indexing="ij")
    return np.asarray(D.keep_mask(seed, p, b, h, i, j))


def layer_keep_mask(layer: Any, call: int, B: int, T: int, S: int) -> np.ndarray:
    """The keep mask of ``layer``'s ``call``-th training call with dropout (flattened batch B)."""
    from mha_cupy._random import derive_seed

    return keep_mask(derive_seed(layer.seed, 7, call), layer.dropout_p, B, layer.nhead, T, S)


def direct(layer: Any, x: Any, x_kv: Any = None, *, reuse_first_head_kv: bool = False, add_input: bool = False,
           keep: Any = None, kv_lengths: Any = None, keys_values: Any = None) -> np.ndarray:
    """Independent float64 computation of ``layer(x, x_kv)`` from its weights (``keep``: a dropout mask
    ``[B, N, T, S]`` over the flattened batch; ``kv_lengths``: keys per row; ``keys_values``: float64 keys and
    values to attend instead of projecting ``x_kv``)."""
    w = {n: None if getattr(layer, n) is None else np.asarray(to_numpy(getattr(layer, n)), dtype=np.float64)
         for n in ("w_q", "w_k", "w_v", "w_kv", "w_qkv", "w_out")}
    x = np.asarray(to_numpy(x), dtype=np.float64)
    src = x if x_kv is None else np.asarray(to_numpy(x_kv), dtype=np.float64)
    E = x.shape[-1]
    B = int(np.prod(x.shape[:-2]))
    xf, sf = x.reshape(B, x.shape[-2], E), src.reshape(B, src.shape[-2], E)
    w_q = w["w_q"][0] if w["w_q"] is not None else w["w_qkv"][0]
    w_k, w_v = (w["w_kv"][0], w["w_kv"][1]) if w["w_kv"] is not None else (
        (w["w_qkv"][1], w["w_qkv"][2]) if w["w_qkv"] is not None else (w["w_k"], w["w_v"]))
    if reuse_first_head_kv:
        w_k, w_v = w_k[:1], w_v[:1]
    q = np.einsum("bte,nhe->btnh", xf, w_q)
    k = np.einsum("bse,khe->bskh", sf, w_k)
    v = np.einsum("bse,kve->bskv", sf, w_v)
    if keys_values is not None:
        k, v = (np.asarray(a, dtype=np.float64) for a in keys_values)
    heads = naive_attention(q, k, v, scale=layer.scale, keep=keep, dropout_p=layer.dropout_p or 0.0,
                            kv_lengths=kv_lengths)
    out = np.einsum("btnv,nve->bte", heads, w["w_out"]).reshape(x.shape)
    return out + x if add_input else out


def direct_kv(layer: Any, x: Any, heads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Independent float64 keys ``[B, S, K, H]`` and values ``[B, S, K, V]`` of ``x [B, S, E]`` (first ``heads``)."""
    w = {n: None if getattr(layer, n) is None else np.asarray(to_numpy(getattr(layer, n)), dtype=np.float64)
         for n in ("w_k", "w_v", "w_kv", "w_qkv")}
    w_k, w_v = (w["w_kv"][0], w["w_kv"][1]) if w["w_kv"] is not None else (
        (w["w_qkv"][1], w["w_qkv"][2]) if w["w_qkv"] is not None else (w["w_k"], w["w_v"]))
    x = np.asarray(to_numpy(x), dtype=np.float64)
    return np.einsum("bse,khe->bskh", x, w_k[:heads]), np.einsum("bse,kve->bskv", x, w_v[:heads])


def philox_by_the_book(counter, key):
    """Philox4x32-10 written out from Salmon et al. (SC'11), Python ints only: the independent reference."""
    (c0, c1, c2, c3), (k0, k1), mask = counter, key, 2**32 - 1
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & mask, (p0 >> 32) ^ c3 ^ k1, p0 & mask
        k0, k1 = (k0 + 0x9E3779B9) & mask, (k1 + 0xBB67AE85) & mask
    return c0, c1, c2, c3


def uniform_by_the_book(seed, stream, size, bits):
    words = [philox_by_the_book((n & 0xFFFFFFFF, n >> 32, stream, 0), (seed & 0xFFFFFFFF, seed >> 32)) for n in range(size)]
    if bits == 53:
        return np.array([((w0 >> 5) * 2.0**26 + (w1 >> 6)) * 2.0**-53 for w0, w1, _, _ in words])
    return np.array([(w0 >> 8) * 2.0**-24 for w0, _, _, _ in words])


def naive_lse(q, k, *, scale=None, mask=None, bias=None, is_causal=False):
    """Independent float64 log-sum-exp ``[B, T, N]`` of the scaled, biased, masked logits (-inf: no key)."""
    q, k = (np.asarray(to_numpy(a), dtype=np.float64) for a in (q, k))
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    k = np.repeat(k, N // K, axis=2)
    logits = np.einsum("bthd,bshd->btsh", q, k) * (1.0 / np.sqrt(H) if scale is None else scale)
    logits = np.moveaxis(logits, 3, 2)  # [B, T, N, S]
    if bias is not None:
        logits = logits + np.asarray(to_numpy(bias), dtype=np.float64)
    allowed = np.ones((B, T, N, S), dtype=bool)
    if mask is not None:
        allowed &= np.asarray(to_numpy(mask), dtype=bool)
    if is_causal:
        allowed &= (np.arange(S)[None, :] <= np.arange(T)[:, None] + (S - T))[None, :, None, :]
    logits = np.where(allowed, logits, -np.inf)
    mx = logits.max(axis=-1)
    safe = np.where(np.isfinite(mx), mx, 0.0)
    with np.errstate(divide="ignore"):
        return safe + np.log(np.exp(logits - safe[..., None]).sum(axis=-1)) if S else np.full((B, T, N), -np.inf)
