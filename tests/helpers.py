"""Test helpers: backends, an ``assert_close`` that checks namespace and dtype, and
an independent float64 attention written with NumPy for parity checks."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from mha_cupy._namespace import device_of, dtype_name, namespace_name, to_numpy
from mha_cupy.compare import scaled_error, tolerance

BACKEND_IDS = ("numpy", "array_api_strict", "array_api_strict-device1", "torch", "cupy")


@dataclass
class Backend:
    name: str
    xp: Any
    device: Any

    def asarray(self, a: Any, dtype: Any = None) -> Any:
        a = np.asarray(a)
        if dtype is not None:
            a = a.astype(dtype_name(dtype) if not isinstance(dtype, str) else dtype)
        if self.name.startswith("array_api_strict"):
            return self.xp.asarray(a, device=self.device)
        if self.name == "torch":
            import torch

            return torch.from_numpy(a.copy()).to(self.device)
        return self.xp.asarray(a, device=self.device)

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
        return "CuPy is not installed (pip install mha_cupy[cuda12])"
    try:
        if not cupy.is_available():
            return "CuPy is installed but finds no CUDA device (cupy.is_available() is False)"
    except Exception as exc:  # noqa: BLE001
        return f"CuPy finds no CUDA device ({exc})"
    return None


def make_backend(name: str) -> Backend:
    from mha_cupy._namespace import default_device, resolve_namespace

    if name == "cupy":
        reason = cupy_skip_reason()
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
    xp = resolve_namespace(lib)
    if name == "array_api_strict-device1":
        return Backend(name, xp, xp.Device("device1"))
    return Backend(name, xp, default_device(xp))


def assert_close(actual: Any, expected: Any, *, xp: Any, dtype: Any, device: Any = None, what: str = "result",
                 tol: float | None = None) -> float:
    """``actual`` is an array of ``xp`` with ``dtype`` (and ``device``) within the tolerance of ``expected``."""
    got = namespace_name(importlib.import_module("array_api_compat").array_namespace(actual))
    assert got == namespace_name(xp), f"{what}: namespace {got}, expected {namespace_name(xp)}"
    assert actual.dtype == dtype, f"{what}: dtype {dtype_name(actual.dtype)}, expected {dtype_name(dtype)}"
    if device is not None:
        assert device_of(actual) == device, f"{what}: device {device_of(actual)}, expected {device}"
    err = scaled_error(actual, expected)
    limit = tolerance(dtype) if tol is None else tol
    assert err <= limit, f"{what}: scaled max abs error {err:.3e} > {limit:.1e}"
    return err


def naive_attention(q, k, v, *, scale=None, mask=None, bias=None, is_causal=False, keep=None, dropout_p=0.0):
    """Direct float64 attention for ``q [B,T,N,H]``, ``k [B,S,K,H]``, ``v [B,S,K,V]`` (repeats kv heads).

    ``keep`` is a ``[B,N,T,S]`` boolean dropout mask. Fully masked rows give 0.
    """
    q, k, v = (np.asarray(to_numpy(a), dtype=np.float64) for a in (q, k, v))
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    k = np.repeat(k, G, axis=2)
    v = np.repeat(v, G, axis=2)
    scale = 1.0 / np.sqrt(H) if scale is None else scale
    logits = np.einsum("bthd,bshd->bhts", q, k) * scale
    allowed = np.ones((B, N, T, S), dtype=bool)
    if mask is not None:
        allowed &= np.broadcast_to(np.moveaxis(np.asarray(to_numpy(mask)).reshape((1,) * (4 - np.ndim(to_numpy(mask))) + np.shape(to_numpy(mask))), 2, 1), (B, N, T, S))
    if bias is not None:
        b = np.asarray(to_numpy(bias), dtype=np.float64)
        b = b.reshape((1,) * (4 - b.ndim) + b.shape)
        logits = logits + np.moveaxis(b, 2, 1)
    if is_causal:
        allowed &= np.arange(S)[None, :] <= np.arange(T)[:, None] + (S - T)
    logits = np.where(allowed, logits, -np.inf)
    mx = logits.max(axis=-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    p = np.exp(logits - mx)
    denom = p.sum(axis=-1, keepdims=True)
    p = p / np.where(denom == 0, 1.0, denom)
    if keep is not None:
        p = np.where(keep, p, 0.0) / (1.0 - dropout_p)
    return np.einsum("bhts,bshd->bthd", p, v)
