"""The library adapters: resolving namespaces, devices, dtypes, conversions, and clear errors
where CuPy cannot run."""

from __future__ import annotations

import builtins
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from helpers import assert_matches_reference, direct, require
from mha_cupy import BackendUnavailableError, MultiHeadAttention
from mha_cupy._backends import convert, resolve_backend, to_numpy


def test_resolve_names_and_modules():
    import array_api_compat

    numpy_be = resolve_backend("numpy")
    assert resolve_backend(None) is numpy_be is resolve_backend(np) and numpy_be.name == "numpy"
    assert array_api_compat.is_numpy_namespace(numpy_be.xp)
    with pytest.raises(ValueError, match=r"xp must be a namespace module or one of .* got 'tensorflow'"):
        resolve_backend("tensorflow")
    with pytest.raises(TypeError, match="xp must be a namespace module"):
        resolve_backend(3)
    with pytest.raises(TypeError, match="not an Array API namespace"):
        resolve_backend(types.ModuleType("fake"))


def test_resolve_dtype():
    be = resolve_backend("numpy")
    assert be.float_dtype(np.float32) == be.xp.float32
    assert be.float_dtype("float64") == be.xp.float64
    with pytest.raises(TypeError, match=r"dtype must be one of the floating dtypes .* got 'int32'"):
        be.float_dtype("int32")


def test_standard_answers_on_every_backend(backend):
    be = backend.adapter
    assert be.itemsize(backend.xp.float32) == 4 and be.itemsize(backend.xp.float64) == 8
    assert be.dtype_name(backend.xp.float32) == "float32"
    assert be.float_dtype("float64") == backend.xp.float64
    if be.is_cpu(backend.device):
        assert be.default_memory_budget(backend.device) == 32 * 2**20
    else:  # a quarter of what the accelerator has free, never below the CPU's budget
        assert be.free_memory(backend.device) > 0
        assert be.default_memory_budget(backend.device) >= 32 * 2**20
    assert backend.name in ("cupy", "torch-cuda", "jax-gpu") or be.is_cpu(backend.device)


def _hide_cupy(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "cupy" or name.startswith("cupy."):
            raise ImportError("No module named 'cupy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.setattr("importlib.import_module", lambda name, package=None: fake_import(name))


def test_cupy_not_installed_says_how_to_install(monkeypatch):
    _hide_cupy(monkeypatch)
    with pytest.raises(BackendUnavailableError, match=re.escape("pip install cupy-cuda12x")) as info:
        MultiHeadAttention(emsize=8, nhead=2, d_k=4, d_v=4, xp="cupy")
    assert info.value.reason == "not-installed" and "not installed" in str(info.value)


def test_cupy_without_gpu_says_the_driver_or_device_is_missing():
    """Runs with the real cupy-cuda12x package that CI installs on a machine without a GPU."""
    try:
        import cupy
    except ImportError:
        pytest.skip("cupy-cuda12x is not installed here (CI installs it to run this test)")
    if cupy.is_available():
        pytest.skip("a CUDA device is present: the no-device error cannot occur")
    with pytest.raises(BackendUnavailableError, match="no usable CUDA driver or GPU") as info:
        MultiHeadAttention(emsize=8, nhead=2, d_k=4, d_v=4, xp="cupy")
    assert info.value.reason == "no-device"
    with pytest.raises(BackendUnavailableError, match="cupy.is_available"):
        resolve_backend(cupy)


def test_cupy_without_gpu_simulated(monkeypatch):
    fake = types.ModuleType("cupy")
    fake.is_available = lambda: False
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(BackendUnavailableError, match="no usable CUDA driver or GPU") as info:
        resolve_backend("cupy")
    assert info.value.reason == "no-device"


def test_to_moves_weights_and_cache_between_backends(backend):
    rng = np.random.default_rng(0)
    layer = MultiHeadAttention(emsize=12, nhead=4, d_k=3, d_v=5, share_kv_across_n_heads=2, dtype="float64", seed=4)
    x = rng.standard_normal((2, 5, 12))
    x_new = rng.standard_normal((2, 3, 12))
    layer(x, cache_kv=True)
    moved = layer.to(backend.xp, device=backend.device)
    assert moved is not layer and moved.xp is backend.xp and moved.device == backend.device
    got = moved(backend.asarray(x_new), use_cached_kv=True)
    assert_matches_reference(got, direct(layer, x_new, x), xp=backend.xp, dtype=backend.xp.float64, device=backend.device, tol=1e-12)
    back = moved.to("numpy")
    np.testing.assert_array_equal(np.asarray(back.w_q), np.asarray(layer.w_q))
    assert layer.xp is resolve_backend("numpy").xp  # the original is untouched


def test_to_casts_weights_and_cache_to_dtype(backend):
    rng = np.random.default_rng(1)
    layer = MultiHeadAttention(emsize=12, nhead=4, d_k=3, d_v=5, share_kv_across_n_heads=2, dtype="float64", seed=4)
    x, x_new = rng.standard_normal((2, 5, 12)), rng.standard_normal((2, 3, 12))
    layer(x, cache_kv=True)
    narrow = layer.to(backend.xp, device=backend.device, dtype="float32")
    assert narrow.dtype == backend.xp.float32 and layer.dtype == np.float64
    np.testing.assert_array_equal(to_numpy(narrow.w_q), np.asarray(layer.w_q, dtype=np.float32))
    got = narrow(backend.asarray(x_new, dtype="float32"), use_cached_kv=True)
    assert got.dtype == backend.xp.float32
    assert_matches_reference(got, direct(layer, x_new, x), xp=backend.xp, dtype=backend.xp.float32,
                             device=backend.device, tol=1e-5)


def test_to_bfloat16_rounds_as_torch_does():
    torch = require("torch")
    layer = MultiHeadAttention(emsize=8, nhead=2, d_k=4, d_v=4, dtype="float32", seed=2)
    half = layer.to("torch", dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and half.w_out.dtype == torch.bfloat16
    expected = torch.from_numpy(np.asarray(layer.w_out)).to(torch.bfloat16)
    assert torch.equal(half.w_out, expected)
    back = half.to("numpy", dtype="float64")  # bfloat16 values are exact in float64
    np.testing.assert_array_equal(np.asarray(back.w_out), expected.to(torch.float64).numpy())


def test_to_dtype_refusal_leaves_the_layer_as_it_was():
    layer = MultiHeadAttention(emsize=8, nhead=2, d_k=4, d_v=4, dtype="float32", seed=2)
    before = np.asarray(layer.w_out).copy()
    with pytest.raises(TypeError, match=r"dtype must be one of the floating dtypes .* of numpy, got 'bfloat16'"):
        layer.to("numpy", dtype="bfloat16")
    assert layer.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(layer.w_out), before)


@pytest.mark.parametrize("device", [np.float64, "float16", np.dtype("float32")])
def test_to_with_a_dtype_in_place_of_the_device_says_to_pass_dtype(device):
    layer = MultiHeadAttention(emsize=8, nhead=2, d_k=4, d_v=4, dtype="float32", seed=2)
    with pytest.raises(TypeError, match=r"device must be a device of numpy, got the dtype .*; pass dtypes as "
                       r"\.to\(xp, dtype=\.\.\.\)"):
        layer.to("numpy", device)


def test_to_dtype_keeps_a_quantized_cache_and_casts_its_scales():
    layer = MultiHeadAttention(emsize=8, nhead=2, d_k=4, d_v=4, dtype="float64", seed=2, kv_cache_dtype="int8")
    layer(np.random.default_rng(0).standard_normal((1, 6, 8)), cache_kv=True)
    narrow = layer.to("numpy", dtype="float32")
    cached = narrow.kv_cache if layer.k_cache is None else narrow.k_cache
    assert cached.dtype == np.int8
    np.testing.assert_array_equal(cached, layer.kv_cache if layer.k_cache is None else layer.k_cache)
    assert all(s.dtype == np.float32 for s in narrow.kv_cache_scales)
    np.testing.assert_array_equal(narrow.kv_cache_scales[0], layer.kv_cache_scales[0].astype(np.float32))


def test_to_moves_a_float8_cache_between_libraries_byte_for_byte():
    require("ml_dtypes")
    torch = require("torch")
    layer = MultiHeadAttention(emsize=8, nhead=2, d_k=4, d_v=4, seed=2, kv_cache_dtype="float8_e4m3fn")
    rng = np.random.default_rng(0)
    x, x_new = rng.standard_normal((2, 6, 8), dtype=np.float32), rng.standard_normal((2, 3, 8), dtype=np.float32)
    layer(x, cache_kv=True)
    stored = np.asarray(layer.kv_cache).view(np.uint8)
    there = layer.to("torch")
    assert there.kv_cache.dtype == torch.float8_e4m3fn
    np.testing.assert_array_equal(there.kv_cache.view(torch.uint8).numpy(), stored)
    back = there.to("numpy")
    np.testing.assert_array_equal(np.asarray(back.kv_cache).view(np.uint8), stored)
    entries = np.asarray(layer.kv_cache).astype(np.float64)  # [B, S, 2, K, H]
    k_scale, v_scale = (np.asarray(s, dtype=np.float64) for s in layer.kv_cache_scales)
    expected = direct(layer, x_new, keys_values=(entries[:, :, 0] * k_scale, entries[:, :, 1] * v_scale))
    assert_matches_reference(there(torch.from_numpy(x_new), use_cached_kv=True), expected, xp=there.xp,
                             dtype=torch.float32, tol=1e-5)


def test_float8_tensors_without_ml_dtypes_say_what_to_install(monkeypatch):
    torch = require("torch")
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import ml_dtypes now raises ImportError
    with pytest.raises(TypeError, match=r"torch.float8_e4m3fn tensors need ml_dtypes .*: pip install ml_dtypes"):
        to_numpy(torch.zeros(3, dtype=torch.float8_e4m3fn))


def test_bfloat16_moves_between_torch_and_numpy_as_torch_converts():
    """The torch adapter widens bfloat16 to float32 and rounds float32 to bfloat16 in NumPy (not by torch ops):
    bit for bit what torch's own conversions give, specials and ties to even included."""
    torch = require("torch")
    from mha_cupy._backends import resolve_backend

    be = resolve_backend("torch")
    a = np.random.default_rng(0).standard_normal(100_000).astype(np.float32) * np.float32(1e3)
    one = np.float32(1.0)
    a[:11] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 3.4e38, -3.4e38, 1e-40, one + np.float32(2.0**-8),
              one + np.float32(3 * 2.0**-8), one + np.float32(2.0**-9)]
    rounded = be.bfloat16_from_numpy(a)
    expected = torch.from_numpy(a).to(torch.bfloat16)
    assert rounded.dtype == torch.bfloat16 and torch.isnan(rounded[0])
    assert torch.equal(rounded[1:].view(torch.int16), expected[1:].view(torch.int16))
    np.testing.assert_array_equal(to_numpy(expected[1:]), expected[1:].float().numpy())
    assert to_numpy(expected).dtype == np.float32


def test_convert_round_trip(backend):
    a = np.arange(6.0).reshape(2, 3)
    there = convert(a, backend.adapter, backend.device)
    np.testing.assert_array_equal(to_numpy(there), a)


def test_layer_refuses_other_namespaces_and_devices():
    xps = require("array_api_strict")
    layer = MultiHeadAttention(emsize=8, nhead=2, d_k=4, d_v=4, dtype="float64", xp=xps, seed=0)
    with pytest.raises(TypeError, match="layer's namespace array_api_strict, got numpy"):
        layer(np.zeros((1, 3, 8)))
    with pytest.raises(ValueError, match="layer's device"):
        layer(xps.zeros((1, 3, 8), dtype=xps.float64, device=xps.Device("device1")))


def test_runtime_modules_import_numpy_only_in_the_adapters():
    pkg = Path(__file__).resolve().parent.parent / "mha_cupy"
    # Host-side tooling: comparisons, tests and the reference harness; never part of a computation.
    tooling = {"testing.py", "_reference.py", "comparison.py"}
    offenders = []
    for path in pkg.rglob("*.py"):
        if path.parent.name == "_backends" or path.name in tooling:
            continue
        for line in path.read_text().splitlines():
            if re.match(r"\s*(import numpy|from numpy)", line):
                offenders.append(f"{path.name}: {line.strip()}")
    assert not offenders, offenders


def test_import_loads_no_optional_library():
    import subprocess

    code = "import sys, mha_cupy; print(sorted(m for m in ('torch', 'tabpfn', 'jax', 'dask', 'cupy', 'numba', 'llvmlite') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
