"""Dask: lazy attention and layer calls over chunked inputs, checked against independent float64
computations (helpers) and against the single-machine NumPy run, on the threaded scheduler and on a
two-process LocalCluster."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import mha_cupy
from helpers import direct, keep_mask, naive_attention, naive_lse, require

da = require("dask.array", reason="needs dask[array]: pip install \".[dask]\"")

TOL = 1e-12


def chunked(a, chunks):
    return da.from_array(a, chunks=chunks)


def problem(B=4, T=24, S=40, N=4, K=2, H=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((B, T, N, H)), rng.standard_normal((B, S, K, H)), rng.standard_normal((B, S, K, H))


@pytest.mark.parametrize("q_chunks, kv_chunks", [
    ((2, 24), (2, 40)),      # batch only
    ((1, 8), (1, 40)),       # batch and queries
    ((4, 24), (4, 13)),      # keys in 4 uneven chunks: a tree of merges
    ((2, 12), (2, 20)),      # all three
])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_equals_float64_reference(q_chunks, kv_chunks, is_causal):
    q, k, v = problem()
    dq = chunked(q, (*q_chunks, 4, 8))
    out, lse = mha_cupy.scaled_dot_product_attention(
        dq, chunked(k, (*kv_chunks, 2, 8)), chunked(v, (*kv_chunks, 2, 8)), is_causal=is_causal, return_lse=True)
    assert isinstance(out, da.Array) and isinstance(out._meta, np.ndarray) and out.chunks == dq.chunks
    assert lse.chunks == dq.chunks[:3]
    mha_cupy.testing.assert_close(out.compute(), naive_attention(q, k, v, is_causal=is_causal), rtol=TOL)
    ref_lse = naive_lse(q, k, is_causal=is_causal)
    assert np.allclose(lse.compute(), ref_lse, rtol=0, atol=TOL)


def test_sdpa_dropout_mask_is_the_single_machine_one():
    q, k, v = problem()
    kw = dict(dropout_p=0.3, seed=11, is_causal=True)
    ours = mha_cupy.scaled_dot_product_attention(chunked(q, (1, 8, 4, 8)), chunked(k, (1, 13, 2, 8)),
                                                 chunked(v, (1, 13, 2, 8)), **kw).compute()
    keep = keep_mask(11, 0.3, 4, 4, 24, 40)  # by-the-book Philox at global (b, n, t, s)
    mha_cupy.testing.assert_close(ours, naive_attention(q, k, v, is_causal=True, keep=keep, dropout_p=0.3), rtol=TOL)
    single = mha_cupy.scaled_dot_product_attention(q, k, v, **kw)
    mha_cupy.testing.assert_close(ours, single, rtol=TOL)


def test_mask_and_bias_follow_the_chunks():
    q, k, v = problem()
    rng = np.random.default_rng(1)
    mask = rng.random((4, 24, 1, 40)) > 0.3
    bias = rng.standard_normal((1, 24, 4, 40))
    out = mha_cupy.scaled_dot_product_attention(
        chunked(q, (2, 12, 4, 8)), chunked(k, (2, 20, 2, 8)), chunked(v, (2, 20, 2, 8)),
        mask=chunked(mask, (2, 12, 1, 20)), bias=chunked(bias, (1, 12, 4, 20)))
    mha_cupy.testing.assert_close(out.compute(), naive_attention(q, k, v, mask=mask, bias=bias), rtol=TOL)


def test_fully_masked_rows_give_zeros_and_minus_infinity():
    q, k, v = problem(B=1, T=3, S=8)
    mask = np.ones((1, 3, 1, 8), bool)
    mask[0, 1] = False
    out, lse = mha_cupy.scaled_dot_product_attention(
        chunked(q, (1, 3, 4, 8)), chunked(k, (1, 3, 2, 8)), chunked(v, (1, 3, 2, 8)),
        mask=chunked(mask, (1, 3, 1, 3)), return_lse=True)
    assert np.all(out.compute()[0, 1] == 0) and np.all(np.isneginf(lse.compute()[0, 1]))


@pytest.mark.parametrize("change, match", [
    (dict(q=(2, 24, 2, 8)), r"q must have one chunk along its heads \(axis 2\).*q\.rechunk\(\{2: -1\}\)"),
    (dict(k=(1, 40, 2, 8), v=(1, 40, 2, 8)), r"k must be chunked along the batch like q.*k\.rechunk\(\{0: q\.chunks\[0\]\}\)"),
    (dict(v=(2, 20, 2, 8)), r"v must be chunked along the keys like k.*v\.rechunk"),
    (dict(k=(2, 40, 2, 4)), r"k must have one chunk along its head size \(axis 3\)"),
])
def test_unsupported_chunkings_name_the_rechunk(change, match):
    q, k, v = problem()
    chunks = dict(q=(2, 24, 4, 8), k=(2, 40, 2, 8), v=(2, 40, 2, 8)) | change
    with pytest.raises(ValueError, match=match):
        mha_cupy.scaled_dot_product_attention(chunked(q, chunks["q"]), chunked(k, chunks["k"]), chunked(v, chunks["v"]))


def test_unknown_chunk_sizes_are_refused():
    q, k, v = problem()
    dq = chunked(q, (2, 24, 4, 8))
    dq = dq[dq[:, 0, 0, 0] > -100]  # boolean indexing: chunk sizes unknown until computed
    with pytest.raises(ValueError, match=r"q must have a known shape, got \(nan, 24, 4, 8\).*q\.compute_chunk_sizes\(\)"):
        mha_cupy.scaled_dot_product_attention(dq, chunked(k, (2, 40, 2, 8)), chunked(v, (2, 40, 2, 8)))


def test_mask_chunked_unlike_the_keys_is_refused():
    q, k, v = problem()
    mask = chunked(np.ones((4, 24, 1, 40), bool), (2, 24, 1, 10))
    with pytest.raises(ValueError, match=r"mask must be chunked along axis 3 as \(40,\).*mask\.rechunk"):
        mha_cupy.scaled_dot_product_attention(chunked(q, (2, 24, 4, 8)), chunked(k, (2, 40, 2, 8)),
                                              chunked(v, (2, 40, 2, 8)), mask=mask)


def test_tasks_grow_with_chunks_only():
    q, k, v = problem(B=8, S=40)

    def tasks(nb, ns):
        out = mha_cupy.scaled_dot_product_attention(
            chunked(q, (8 // nb, 24, 4, 8)), chunked(k, (8 // nb, 40 // ns, 2, 8)), chunked(v, (8 // nb, 40 // ns, 2, 8)))
        inputs = nb + 2 * nb * ns
        return len(out.__dask_graph__()) - inputs

    # per (batch) block: ns partials, ns - 1 merges, one output
    assert tasks(1, 1) == 2 and tasks(4, 1) == 8 and tasks(4, 5) == 4 * (5 + 4 + 1)


# -- the layer ----------------------------------------------------------------------------------------


def layer(**kw):
    return mha_cupy.MultiHeadAttention(emsize=32, nhead=4, d_k=8, d_v=8, dtype="float64", seed=0, **kw)


def inputs(B=6, T=20, S=50):
    rng = np.random.default_rng(2)
    return rng.standard_normal((B, T, 32)), rng.standard_normal((B, S, 32))


@pytest.mark.parametrize("kv_chunks", [(2, 50, 32), (3, 17, 32)])
def test_layer_cross_attention_with_dropout_equals_numpy(kv_chunks):
    x, x_kv = inputs()
    kw = dict(share_kv_across_n_heads=2, dropout_p=0.2)
    lazy = layer(**kw).to("dask")
    y = lazy(chunked(x, (kv_chunks[0], 10, 32)), chunked(x_kv, kv_chunks), training=True)
    assert isinstance(y, da.Array) and y.chunks[0] == (kv_chunks[0],) * (6 // kv_chunks[0])
    eager = layer(**kw)
    mha_cupy.testing.assert_close(y.compute(), eager(x, x_kv, training=True), rtol=TOL)
    mha_cupy.testing.assert_close(layer(**kw).to("dask")(chunked(x, (2, 10, 32)), chunked(x_kv, kv_chunks[:1] + (25, 32))
                                                        if kv_chunks[0] == 2 else chunked(x_kv, (2, 25, 32))).compute(),
                                  direct(eager, x, x_kv), rtol=TOL)


def test_layer_keywords_on_dask():
    x, x_kv = inputs()
    dx, dkv = chunked(x, (2, 10, 32)), chunked(x_kv, (2, 25, 32))
    for kw in (dict(reuse_first_head_kv=True), dict(add_input=True, save_peak_mem_factor=3, allow_inplace=True)):
        ref = layer()(x.copy(), x_kv, **kw)
        mha_cupy.testing.assert_close(layer().to("dask")(dx, dkv, **kw).compute(), ref, rtol=TOL)
    assert isinstance(dx.compute(), np.ndarray) and np.array_equal(dx.compute(), x)  # inputs stay as they were


def test_cache_stays_lazy_with_its_chunks_and_serves_later_calls():
    x, x_kv = inputs()
    lazy, eager = layer().to("dask"), layer()
    lazy(chunked(x_kv, (2, 25, 32)), cache_kv=True)
    eager(x_kv, cache_kv=True)
    assert isinstance(lazy.kv_cache, da.Array) and lazy.kv_cache.chunks[:2] == ((2, 2, 2), (25, 25))
    y = lazy(chunked(x, (2, 10, 32)), use_cached_kv=True)
    mha_cupy.testing.assert_close(y.compute(), eager(x, use_cached_kv=True), rtol=TOL)
    more = np.random.default_rng(3).standard_normal((6, 7, 32))
    y = lazy(chunked(more, (2, 7, 32)), cache_kv=True, append_kv=True)
    mha_cupy.testing.assert_close(y.compute(), eager(more, cache_kv=True, append_kv=True), rtol=TOL)
    assert lazy.kv_cache.shape == eager.kv_cache.shape == (6, 57, 2, 4, 8)


def test_weights_are_embedded_once_in_the_graph():
    big = mha_cupy.MultiHeadAttention(emsize=192, nhead=6, d_k=32, d_v=32, dtype="float64", seed=0).to("dask")
    x = np.random.default_rng(0).standard_normal((16, 8, 192))
    weights = 4 * 192 * 192 * 8  # w_qkv and w_out: 1.2 MB

    def graph_bytes(rows_per_chunk):
        y = big(chunked(x, (rows_per_chunk, 8, 192)))
        return len(pickle.dumps(dict(y.__dask_graph__())))

    one, sixteen = graph_bytes(16), graph_bytes(1)
    assert one > weights and sixteen - one < weights / 4, (one, sixteen)


def test_compare_and_testing_take_dask_arrays():
    a = chunked(np.arange(6.0), 2)
    assert mha_cupy.compare(a, np.arange(6.0)).ok


# -- a distributed cluster ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client():
    distributed = require("distributed", reason="needs dask[distributed]: pip install \".[dask]\"")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as c:
        yield c


def test_key_chunked_context_on_two_worker_processes(client):
    q, k, v = problem(B=2, T=8, S=600, N=4, K=1, H=16)
    out = mha_cupy.scaled_dot_product_attention(chunked(q, (1, 8, 4, 16)), chunked(k, (2, 100, 1, 16)).rechunk(
        {0: 1}), chunked(v, (1, 100, 1, 16)), dropout_p=0.1, seed=3)
    result = client.compute(out).result()
    assert len(client.scheduler_info()["workers"]) == 2
    keep = keep_mask(3, 0.1, 2, 4, 8, 600)
    mha_cupy.testing.assert_close(result, naive_attention(q, k, v, keep=keep, dropout_p=0.1), rtol=TOL)


def test_layer_on_two_worker_processes(client):
    x, x_kv = inputs()
    lazy = layer(dropout_p=0.1).to("dask")
    y = client.compute(lazy(chunked(x, (3, 20, 32)), chunked(x_kv, (3, 10, 32)), training=True)).result()
    mha_cupy.testing.assert_close(y, layer(dropout_p=0.1)(x, x_kv, training=True), rtol=TOL)
