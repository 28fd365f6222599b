"""Zero-copy views and the absence of repeated K/V."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from helpers import naive_attention, require
from mha_cupy import broadcast_kv_across_heads, scaled_dot_product_attention


def test_broadcast_shares_memory_with_zero_stride():
    kv = np.random.default_rng(0).standard_normal((2, 5, 3, 4))
    view = broadcast_kv_across_heads(kv, 4)
    assert view.shape == (2, 5, 3, 4, 4)
    assert np.shares_memory(view, kv)
    assert view.strides[-2] == 0
    np.testing.assert_array_equal(view[:, :, 1, 2], kv[:, :, 1])  # head (k, g) is kv head k


def test_broadcast_is_a_view_on_torch():
    torch = require("torch", reason="needs torch")
    kv = torch.randn(2, 5, 3, 4)
    view = broadcast_kv_across_heads(kv, 4)
    assert view.data_ptr() == kv.data_ptr() and view.stride()[-2] == 0


def test_broadcast_on_every_backend(backend):
    kv = np.arange(24.0).reshape(2, 3, 4)
    got = broadcast_kv_across_heads(backend.asarray(kv), 2)
    assert tuple(got.shape) == (2, 3, 2, 4)


@pytest.mark.parametrize("n,exc", [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_broadcast_bad_n(n, exc):
    with pytest.raises(exc, match=r"n must be an int >= 1, got"):
        broadcast_kv_across_heads(np.zeros((2, 3)), n)


def test_broadcast_bad_rank():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        broadcast_kv_across_heads(np.zeros(3), 2)


@pytest.mark.slow
def test_grouped_attention_allocates_no_repeated_kv():
    # 8 query heads on 1 kv head: a repeated copy of K and V would be 8x their size.
    rng = np.random.default_rng(0)
    T, S, N, H = 64, 65536, 8, 64
    q = rng.standard_normal((1, T, N, H), dtype=np.float32)
    k = rng.standard_normal((1, S, 1, H), dtype=np.float32)
    v = rng.standard_normal((1, S, 1, H), dtype=np.float32)
    one_repeat = (N - 1) * k.nbytes  # the extra bytes a repeat() of K alone would take
    tracemalloc.start()
    try:
        out = scaled_dot_product_attention(q, k, v, memory_budget="4MiB")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < k.nbytes < one_repeat, f"peak {peak} bytes vs K {k.nbytes}"
    rows = [0, 17, 63]
    expected = naive_attention(q[:, rows], k, v)
    np.testing.assert_allclose(out[:, rows], expected, rtol=0, atol=1e-5)
