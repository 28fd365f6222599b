"""The KV cache on every backend: writes, capacity growth, views (functional on JAX)."""

from __future__ import annotations

import numpy as np

from mha_cupy import MultiHeadAttention
from mha_cupy._backends import to_numpy
from mha_cupy._cache import KVCache


def test_kv_layout_writes_grow_and_read_back(backend):
    xp, rng = backend.xp, np.random.default_rng(0)
    cache = KVCache.allocate([(2, 3, 2, 1, 4)], 3, xp=xp, dtype=xp.float64, device=backend.device)
    k, v = rng.standard_normal((2, 3, 2, 4)), rng.standard_normal((2, 3, 2, 4))
    cache.write(slice(0, 2), slice(0, 3), backend.asarray(k), backend.asarray(v))  # first of 2 heads kept
    cache.reserve(4, xp=xp)
    assert cache.arrays[0].shape[1] == 7 and cache.length == 3  # max(need, 2 * capacity)
    k2, v2 = rng.standard_normal((1, 4, 1, 4)), rng.standard_normal((1, 4, 1, 4))
    cache.length += 4
    cache.write(slice(1, 2), slice(3, 7), backend.asarray(k2), backend.asarray(v2))
    keys, values = cache.keys_values(1, 2)
    np.testing.assert_array_equal(to_numpy(keys), np.concatenate([k[1:, :, :1], k2], axis=1))
    np.testing.assert_array_equal(to_numpy(values), np.concatenate([v[1:, :, :1], v2], axis=1))
    assert cache.layout() == [(2, 2, 1, 4)]
    moved = cache.moved(lambda a: a[:, :, :, :, :2])
    assert moved.length == 7 and moved.arrays[0].shape == (2, 7, 2, 1, 2)


def test_k_v_layout(backend):
    xp, rng = backend.xp, np.random.default_rng(1)
    cache = KVCache.allocate([(1, 2, 2, 3), (1, 2, 2, 5)], 2, xp=xp, dtype=xp.float64, device=backend.device)
    k, v = rng.standard_normal((1, 2, 2, 3)), rng.standard_normal((1, 2, 2, 5))
    cache.write(slice(0, 1), slice(0, 2), backend.asarray(k), backend.asarray(v))
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
