"""The KV cache on every backend: writes, capacity growth, views (functional on JAX); row lengths on the layer;
quantized caches."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_matches_reference, make_backend, require
from mha_cupy import MultiHeadAttention
from mha_cupy.testing import scaled_error
from mha_cupy._backends import to_numpy
from mha_cupy._cache import KVCache


def test_kv_layout_writes_grow_and_read_back(backend):
    xp, rng = backend.xp, np.random.default_rng(0)
    cache = KVCache.allocate([(2, 3, 2, 1, 4)], 3, be=backend.adapter, dtype=xp.float64, device=backend.device)
    k, v = rng.standard_normal((2, 3, 2, 4)), rng.standard_normal((2, 3, 2, 4))
    cache.write(slice(0, 2), slice(0, 3), backend.asarray(k), backend.asarray(v), be=backend.adapter)  # first of 2 heads kept
    cache.reserve(4, xp=xp)
    assert cache.arrays[0].shape[1] == 7 and cache.length == 3  # max(need, 2 * capacity)
    k2, v2 = rng.standard_normal((1, 4, 1, 4)), rng.standard_normal((1, 4, 1, 4))
    cache.length += 4
    cache.write(slice(1, 2), slice(3, 7), backend.asarray(k2), backend.asarray(v2), be=backend.adapter)
    keys, values = cache.keys_values(1, 2)
    np.testing.assert_array_equal(to_numpy(keys), np.concatenate([k[1:, :, :1], k2], axis=1))
    np.testing.assert_array_equal(to_numpy(values), np.concatenate([v[1:, :, :1], v2], axis=1))
    assert cache.layout() == [(2, 2, 1, 4)]
    moved = cache.moved(lambda a: a[:, :, :, :, :2])
    assert moved.length == 7 and moved.arrays[0].shape == (2, 7, 2, 1, 2)


def test_k_v_layout(backend):
    xp, rng = backend.xp, np.random.default_rng(1)
    cache = KVCache.allocate([(1, 2, 2, 3), (1, 2, 2, 5)], 2, be=backend.adapter, dtype=xp.float64, device=backend.device)
    k, v = rng.standard_normal((1, 2, 2, 3)), rng.standard_normal((1, 2, 2, 5))
    cache.write(slice(0, 1), slice(0, 2), backend.asarray(k), backend.asarray(v), be=backend.adapter)
    assert not cache.is_kv and cache.batch == 1
    got_k, got_v = (to_numpy(a) for a in cache.views())
    np.testing.assert_array_equal(got_k, k)
    np.testing.assert_array_equal(got_v, v)


def test_streaming_capacity_doubles():
    layer = MultiHeadAttention(emsize=12, nhead=4, d_k=3, d_v=3, share_kv_across_n_heads=2, dtype="float64", seed=21)
    x = np.random.default_rng(7).standard_normal((1, 1, 12))
    caps = []
    for _ in range(40):
        layer(x, cache_kv=True, append_kv=True)
        caps.append(layer._cache.arrays[0].shape[1])
    assert layer.kv_cache.shape[1] == 40
    assert len(set(caps)) <= 7  # 1, 2, 4, 8, 16, 32, 64: O(log n) reallocations


# -- kv_seq_lengths on the layer, and quantized caches (kv_cache_dtype) -------------------------------------------


def test_layer_kv_seq_lengths(backend):
    from helpers import direct

    from mha_cupy import MultiHeadAttention

    layer = MultiHeadAttention(emsize=16, nhead=4, d_k=4, d_v=4, share_kv_across_n_heads=2, dtype="float64",
                               xp=backend.xp, device=backend.device, seed=1)
    rng = np.random.default_rng(2)
    x, x_kv = rng.standard_normal((3, 5, 16)), rng.standard_normal((3, 11, 16))
    x_kv[1, 4:] = np.nan  # padding past row 1's length is never read
    lengths = np.array([11, 4, 0])
    got = layer(backend.asarray(x), backend.asarray(x_kv), kv_seq_lengths=backend.asarray(lengths), kv_chunk_size=3)
    expected = direct(layer, x, np.nan_to_num(x_kv), kv_lengths=lengths)
    assert_matches_reference(got, expected, xp=backend.xp, dtype=backend.xp.float64, tol=1e-12)


def quantized_layer(backend, name, dtype="float32"):
    from mha_cupy import MultiHeadAttention

    if name not in backend.adapter.quantized_dtypes():
        pytest.skip(f"{backend.name} has no {name} dtype")
    return MultiHeadAttention(emsize=16, nhead=4, d_k=4, d_v=6, share_kv_across_n_heads=2, dtype=dtype,
                              xp=backend.xp, device=backend.device, seed=3, kv_cache_dtype=name)  # k_cache, v_cache


@pytest.mark.parametrize("name", ["int8", "float8_e4m3fn"])
def test_quantized_cache_stores_tabpfns_scheme_and_reads_equal_the_dequantized_cache(backend, name):
    """What is stored is TabPFN 9's symmetric per-row quantization of the keys (computed here in float64 from
    the weights); calls over the cache equal float64 attention over the dequantized cache; the error against
    the unquantized cache is what quantizing costs (int8 ~1e-2, float8 ~5e-2 of max |y| here)."""
    from helpers import direct, direct_kv

    layer = quantized_layer(backend, name, "float64")
    rng = np.random.default_rng(4)
    x_kv, x = rng.standard_normal((2, 40, 16)), rng.standard_normal((2, 6, 16))
    layer(backend.asarray(x_kv), cache_kv=True)
    k_true, v_true = direct_kv(layer, x_kv)
    k_scale, v_scale = (to_numpy(s).astype(np.float64) for s in layer.kv_cache_scales)
    top = {"int8": 127.0, "float8_e4m3fn": 448.0}[name]
    np.testing.assert_allclose(k_scale[:, 0, 0, 0], np.abs(k_true).max(axis=(1, 2, 3)) / top, rtol=1e-12)
    stored_k = to_numpy(backend.xp.astype(layer.k_cache, backend.xp.float64))
    if name == "int8":
        assert layer.k_cache.dtype == backend.xp.int8
        np.testing.assert_array_equal(stored_k, np.clip(np.round(k_true / k_scale), -127, 127))
    else:
        assert np.abs(stored_k - k_true / k_scale).max() <= top * 2.0**-4  # e4m3: 3 mantissa bits
    stored_v = to_numpy(backend.xp.astype(layer.v_cache, backend.xp.float64))
    got = layer(backend.asarray(x), use_cached_kv=True, kv_chunk_size=7)
    expected = direct(layer, x, keys_values=(stored_k * k_scale, stored_v * v_scale))
    assert_matches_reference(got, expected, xp=backend.xp, dtype=backend.xp.float64, tol=1e-12)
    error = scaled_error(got, direct(layer, x, keys_values=(k_true, v_true)))
    assert 0 < error < {"int8": 0.02, "float8_e4m3fn": 0.1}[name]


def test_quantized_cache_appends_keep_their_own_scales(backend):
    from helpers import direct

    layer = quantized_layer(backend, "int8", "float64")
    rng = np.random.default_rng(5)
    first, second = rng.standard_normal((2, 9, 16)), 10 * rng.standard_normal((2, 4, 16))
    layer(backend.asarray(first), cache_kv=True)
    stored = to_numpy(layer.k_cache).copy()
    layer(backend.asarray(second), cache_kv=True, append_kv=True)
    np.testing.assert_array_equal(to_numpy(layer.k_cache)[:, :9], stored)  # nothing requantized
    k_scale, v_scale = (to_numpy(s) for s in layer.kv_cache_scales)
    assert k_scale.shape == (2, 13, 1, 1) and np.all(k_scale[:, 9:] > 5 * k_scale[:, :9].max())
    x = rng.standard_normal((2, 3, 16))
    got = layer(backend.asarray(x), use_cached_kv=True, kv_chunk_size=5)
    kv = (to_numpy(backend.xp.astype(a, backend.xp.float64)) * s for a, s in zip((layer.k_cache, layer.v_cache),
                                                                                 (k_scale, v_scale)))
    assert_matches_reference(got, direct(layer, x, keys_values=tuple(kv)), xp=backend.xp, dtype=backend.xp.float64,
                             tol=1e-12)


def test_vjp_over_a_quantized_cache_equals_finite_differences():
    from helpers import direct

    layer = quantized_layer(make_backend("numpy"), "int8", "float64")
    rng = np.random.default_rng(6)
    layer(rng.standard_normal((1, 12, 16)), cache_kv=True)
    x, d_out = rng.standard_normal((1, 3, 16)), rng.standard_normal((1, 3, 16))
    kv = (layer.k_cache.astype(np.float64) * layer.kv_cache_scales[0], layer.v_cache.astype(np.float64) * layer.kv_cache_scales[1])
    dx, _, _ = layer.vjp(x, d_out, use_cached_kv=True)
    eps, numeric = 1e-6, np.zeros_like(x)
    for i in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[i] += eps
        minus[i] -= eps
        numeric[i] = ((direct(layer, plus, keys_values=kv) - direct(layer, minus, keys_values=kv)) * d_out).sum() / (2 * eps)
    np.testing.assert_allclose(dx, numeric, rtol=0, atol=1e-7)


@pytest.mark.parametrize(("name", "xp", "error", "words"), [
    ("int4", "numpy", ValueError, r"kv_cache_dtype must be None or one of \['float8_e4m3fn', 'int8'\], got 'int4'"),
    (8, "numpy", TypeError, "kv_cache_dtype must be None or one of"),
    ("float8_e4m3fn", "array_api_strict", ValueError, "not available on array_api_strict"),
    ("int8", "dask", ValueError, "lazy arrays keep their cache unquantized"),
])
def test_kv_cache_dtype_refusals(name, xp, error, words):
    from mha_cupy import MultiHeadAttention

    require({"dask": "dask.array"}.get(xp, xp))
    with pytest.raises(error, match=words):
        MultiHeadAttention(emsize=8, nhead=2, d_k=4, d_v=4, xp=xp, kv_cache_dtype=name)
