"""Dropout: the documented keep mask, chunk- and backend-independence, statistics (Philox itself: test_random.py)."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import keep_mask, naive_attention, philox_by_the_book, require
from mha_cupy import _random as R
from mha_cupy import dropout as D
from mha_cupy import scaled_dot_product_attention as sdpa
from mha_cupy._backends import to_numpy


def qkv(seed=0, B=2, T=5, S=7, N=4, K=2, H=3):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, T, N, H)), rng.standard_normal((B, S, K, H)), rng.standard_normal((B, S, K, H)))


def keep_mask_np(seed, p, B, N, T, S):
    """The documented mask from the by-the-book Philox, element by element."""
    key, thr = R.split_seed(seed), D.keep_threshold(p)
    keep = np.empty((B, N, T, S), dtype=bool)
    for idx in np.ndindex(keep.shape):
        b, h, i, j = idx
        keep[idx] = philox_by_the_book((j, i, h, b), key)[0] >= thr
    return keep


def test_dropout_equals_direct_computation_with_the_documented_mask():
    q, k, v = qkv()
    keep = keep_mask_np(123, 0.3, 2, 4, 5, 7)
    expected = naive_attention(q, k, v, keep=keep, dropout_p=0.3)
    got = sdpa(q, k, v, dropout_p=0.3, seed=123, q_chunk_size=2, kv_chunk_size=3)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunks", [(1, 1), (2, 3), (5, 7), (4, 2)], ids=str)
def test_dropout_is_bitwise_the_same_at_every_chunking_and_backend(backend, chunks):
    q, k, v = qkv(1)
    keep = keep_mask_np(99, 0.25, 2, 4, 5, 7)
    expected = naive_attention(q, k, v, keep=keep, dropout_p=0.25)
    got = sdpa(*(backend.asarray(a) for a in (q, k, v)), dropout_p=0.25, seed=99,
               q_chunk_size=chunks[0], kv_chunk_size=chunks[1])
    # Outputs differ only by the online softmax's rounding; a different keep mask would move them by O(1).
    np.testing.assert_allclose(to_numpy(got), expected, rtol=0, atol=1e-12)
    lanes = backend.adapter.philox_lanes()
    keep_here = D.keep_mask(99, 0.25, *(backend.xp.astype(backend.asarray(np.arange(n).reshape(s)), lanes)
                                        for n, s in ((2, (2, 1, 1, 1)), (4, (1, 4, 1, 1)), (5, (1, 1, 5, 1)), (7, (1, 1, 1, 7)))))
    np.testing.assert_array_equal(to_numpy(keep_here), keep)


def test_different_seeds_differ_and_same_seed_repeats():
    q, k, v = qkv(2)
    a = sdpa(q, k, v, dropout_p=0.5, seed=1)
    b = sdpa(q, k, v, dropout_p=0.5, seed=1)
    c = sdpa(q, k, v, dropout_p=0.5, seed=2)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drop_rate_matches_p(p):
    stats = require("scipy.stats")
    keep = keep_mask(7, p, 4, 8, 64, 64)
    dropped = int((~keep).sum())
    assert stats.binomtest(dropped, keep.size, p).pvalue > 1e-3


@pytest.mark.slow
def test_mean_over_seeds_is_the_no_dropout_output():
    stats = require("scipy.stats")
    q, k, v = qkv(3, B=1, T=3, S=6, N=2, K=1)
    clean = naive_attention(q, k, v)
    samples = np.stack([sdpa(q, k, v, dropout_p=0.3, seed=s) for s in range(400)])
    t = stats.ttest_1samp(samples, clean, axis=0)
    # Many outputs tested at once: Bonferroni over them.
    assert t.pvalue.min() > 1e-3 / clean.size


def test_keep_threshold_edges():
    assert D.keep_threshold(0.0) == 0 and D.keep_threshold(1.0) == 2**32
    q, k, v = qkv(4)
    assert np.all(sdpa(q, k, v, dropout_p=1.0, seed=3) == 0)
    np.testing.assert_allclose(sdpa(q, k, v, dropout_p=0.0, seed=3), naive_attention(q, k, v), atol=1e-12, rtol=0)


