"""The layer on every backend: options, caches, streaming appends, dropout, memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from helpers import assert_matches_reference, direct, direct_kv, layer_keep_mask, naive_attention
from mha_cupy import MultiHeadAttention
from mha_cupy._backends import to_numpy


def make(backend=None, **kw):
    base = dict(emsize=12, nhead=4, d_k=3, d_v=3, share_kv_across_n_heads=2, dropout_p=0.3, dtype="float64", seed=21)
    layer = MultiHeadAttention(**{**base, **kw})
    return layer if backend is None else layer.to(backend.xp, device=backend.device)


OPTIONS = [
    dict(),
    dict(add_input=True),
    dict(add_input=True, allow_inplace=True, save_peak_mem_factor=3),
    dict(reuse_first_head_kv=True, cross=True),
    dict(cross=True, q_chunk_size=2, kv_chunk_size=3),
    dict(training=True),
    dict(training=True, q_chunk_size=1, kv_chunk_size=2, save_peak_mem_factor=2, allow_inplace=True),
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "plain")
def test_every_option_equals_direct_computation_on_every_backend(backend, opts):
    opts = dict(opts)
    cross = opts.pop("cross", False)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 5, 12))
    x_kv = rng.standard_normal((2, 3, 7, 12)) if cross else None
    layer = make(backend)
    keep = layer_keep_mask(layer, 0, 6, 5, 7 if cross else 5) if opts.get("training") else None
    expected = direct(layer, x, x_kv, reuse_first_head_kv=opts.get("reuse_first_head_kv", False),
                      add_input=opts.get("add_input", False), keep=keep)
    got = layer(backend.asarray(x), None if x_kv is None else backend.asarray(x_kv), **opts)
    # Dropout masks are the documented Philox masks on every library, so training outputs agree to rounding.
    assert_matches_reference(got, expected, xp=backend.xp, dtype=backend.xp.float64, device=backend.device, tol=1e-12)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_low_precision_layer(backend, dtype):
    if not hasattr(backend.xp, dtype):  # the library lacks it: asking for it is a clear error
        with pytest.raises(TypeError, match=f"dtype must be one of the floating dtypes .* got '{dtype}'"):
            MultiHeadAttention(emsize=8, nhead=2, d_k=4, d_v=4, dtype=dtype, xp=backend.xp)
        return
    layer = MultiHeadAttention(emsize=64, nhead=4, d_k=16, d_v=16, share_kv_across_n_heads=2, dtype=dtype,
                               xp=backend.xp, device=backend.device, seed=1)
    x = backend.xp.astype(backend.asarray(np.random.default_rng(11).standard_normal((2, 40, 64))), backend.dtype(dtype))
    out = layer(x, kv_chunk_size=9)
    expected = direct(layer, to_numpy(x).astype(np.float64))  # float64 from the same rounded weights and inputs
    assert_matches_reference(out, expected, xp=backend.xp, dtype=backend.dtype(dtype), device=backend.device)


def test_layer_equals_direct_computation():
    rng = np.random.default_rng(4)
    for kw in (dict(), dict(d_v=5), dict(share_kv_across_n_heads=1), dict(share_kv_across_n_heads=4)):
        layer = make(**kw)
        x, x_kv = rng.standard_normal((3, 4, 12)), rng.standard_normal((3, 6, 12))
        np.testing.assert_allclose(layer(x), direct(layer, x), rtol=0, atol=1e-12)
        np.testing.assert_allclose(layer(x, x_kv), direct(layer, x, x_kv), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kw", [dict(), dict(d_v=5), dict(share_kv_across_n_heads=1)], ids=["kv", "k_v", "qkv"])
def test_cache_then_use_on_every_backend(backend, kw):
    rng = np.random.default_rng(5)
    x, x_new = rng.standard_normal((2, 6, 12)), rng.standard_normal((2, 3, 12))
    layer = make(backend, **kw)
    expected = direct(layer, x_new, x, keep=layer_keep_mask(layer, 0, 2, 3, 6))
    layer(backend.asarray(x), cache_kv=True)
    got = layer(backend.asarray(x_new), use_cached_kv=True, training=True)
    assert_matches_reference(got, expected, xp=backend.xp, dtype=backend.xp.float64, device=backend.device, tol=1e-12)
    layer.empty_kv_cache()
    assert not layer.has_cached_kv and layer.kv_cache is None and layer.k_cache is None


@pytest.mark.parametrize("pieces", [[6], [1, 2, 3], [2, 2, 2], [5, 1], [1, 1, 1, 1, 1, 1]], ids=str)
@pytest.mark.parametrize("kw", [dict(), dict(d_v=5), dict(share_kv_across_n_heads=1)], ids=["kv", "k_v", "qkv"])
def test_streaming_append_equals_feeding_whole(backend, pieces, kw):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, sum(pieces), 12))
    x_new = rng.standard_normal((2, 4, 12))
    layer = make(backend, **kw)
    start = 0
    for n in pieces:
        piece = layer(backend.asarray(x[:, start:start + n]), cache_kv=True, append_kv=True)
        start += n
        # Each piece attends to everything fed so far (its own keys included).
        expected_piece = direct(layer, x[:, start - n:start], x[:, :start])
        assert_matches_reference(piece, expected_piece, xp=backend.xp, dtype=backend.xp.float64, tol=1e-12)
    k, v = direct_kv(layer, x)
    if layer.kv_cache is not None:
        assert_matches_reference(layer.kv_cache, np.stack([k, v], axis=2), xp=backend.xp, dtype=backend.xp.float64, tol=1e-12)
    else:
        assert_matches_reference(layer.k_cache, k, xp=backend.xp, dtype=backend.xp.float64, tol=1e-12)
        assert_matches_reference(layer.v_cache, v, xp=backend.xp, dtype=backend.xp.float64, tol=1e-12)
    got_new = layer(backend.asarray(x_new), use_cached_kv=True)
    assert_matches_reference(got_new, direct(layer, x_new, x), xp=backend.xp, dtype=backend.xp.float64, tol=1e-12)


def test_cache_kv_without_append_replaces():
    layer = make()
    rng = np.random.default_rng(8)
    layer(rng.standard_normal((2, 5, 12)), cache_kv=True)
    layer(rng.standard_normal((2, 3, 12)), cache_kv=True)
    assert layer.kv_cache.shape == (2, 3, 2, 2, 3)


@pytest.mark.slow
def test_save_peak_mem_factor_lowers_peak_memory():
    # A wide flattened batch: projections and output scale with it; the factor splits them.
    layer = MultiHeadAttention(emsize=96, nhead=4, d_k=24, d_v=24, seed=0)
    x = np.random.default_rng(9).standard_normal((128, 64, 96)).astype(np.float32)
    peaks = {}
    for factor in (None, 8):
        xi = x.copy()
        tracemalloc.start()
        try:
            out = layer(xi, add_input=True, allow_inplace=factor is not None, save_peak_mem_factor=factor)
            peaks[factor] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        if factor is None:
            expected = out
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
    assert peaks[8] < 0.5 * peaks[None], peaks


@pytest.mark.slow
def test_long_sequence_memory_is_bounded_by_default():
    # B=1, H=6, L=16384, d=32, float32: the score matrix alone would be 6.4 GB.
    rng = np.random.default_rng(10)
    L, N, H = 16384, 6, 32
    from mha_cupy import scaled_dot_product_attention

    q, k, v = (rng.standard_normal((1, L, N, H), dtype=np.float32) for _ in range(3))
    tracemalloc.start()
    try:
        out = scaled_dot_product_attention(q, k, v)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 * 2**20, f"peak growth {peak / 2**20:.1f} MiB"
    rows = [0, 4097, 16383]
    expected = naive_attention(q[:, rows], k, v)
    np.testing.assert_allclose(out[:, rows], expected, rtol=0, atol=1e-5)


def test_precomputed_kv_with_one_shared_head():
    rng = np.random.default_rng(12)
    pre = rng.standard_normal((2, 5, 2, 1, 3))  # a first-head cache: one head for all
    layer = make(precomputed_kv=pre)
    x = rng.standard_normal((2, 4, 12))
    q = np.einsum("bte,nhe->btnh", x, np.asarray(layer.w_q)[0])
    expected = np.einsum("btnv,nve->bte", naive_attention(q, pre[:, :, 0], pre[:, :, 1]), np.asarray(layer.w_out))
    np.testing.assert_allclose(layer(x, use_cached_kv=True), expected, rtol=0, atol=1e-12)


def test_emsize_need_not_be_divisible_by_nhead():
    layer = make(emsize=10, nhead=4, d_k=3, d_v=2)
    x = np.random.default_rng(13).standard_normal((2, 4, 10))
    np.testing.assert_allclose(layer(x), direct(layer, x), rtol=0, atol=1e-12)


def test_signature_defaults_follow_the_issue_api():
    import inspect

    params = inspect.signature(MultiHeadAttention).parameters
    assert params["dtype"].default is np.float32
    assert params["share_kv_across_n_heads"].default == 1 and params["init_gain"].default == 1.0
    for name in ("xp", "device", "seed", "dropout_p", "softmax_scale", "precomputed_kv"):
        assert params[name].default is None
