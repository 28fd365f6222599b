"""Zero lengths and hidden keys, on every backend: an empty batch gives an empty result (layer, function,
vjp), and a key no query may see contributes nothing even when its key or value holds NaN or inf.

References: a direct float64 attention (``helpers.naive_attention``) and torch autograd of one
(``test_backward.torch_grads``), both over the clean inputs: a hidden key's values do not matter there.
"""

from __future__ import annotations

import numpy as np
import pytest

import mha_cupy
from helpers import naive_attention, require
from mha_cupy import MultiHeadAttention, scaled_dot_product_attention, scaled_dot_product_attention_vjp
from mha_cupy.testing import assert_close
from test_backward import torch_grads

TOL = 1e-10


def padded_problem(seed=0, B=2, T=5, S=7, N=4, K=2, H=3, V=2):
    """Keys 4-6 of batch row 0 and key 0 of row 1 hidden by a key-padding mask and filled with NaN and inf."""
    rng = np.random.default_rng(seed)
    q, k, v, d_out = (rng.standard_normal(s) for s in ((B, T, N, H), (B, S, K, H), (B, S, K, V), (B, T, N, V)))
    mask = np.ones((B, 1, 1, S), bool)
    mask[0, ..., 4:], mask[1, ..., 0] = False, False
    k_bad, v_bad = k.copy(), v.copy()
    k_bad[0, 4:], v_bad[0, 4:] = np.inf, np.nan
    k_bad[1, 0], v_bad[1, 0] = np.nan, -np.inf
    return (q, k, v, d_out, mask), (k_bad, v_bad)


@pytest.mark.parametrize("chunks", [(None, None), (2, 3), (1, 1)], ids=str)
def test_hidden_keys_contribute_nothing_forward(backend, chunks):
    (q, k, v, _, mask), (k_bad, v_bad) = padded_problem()
    expected = naive_attention(q, k, v, mask=mask)
    got = scaled_dot_product_attention(backend.asarray(q), backend.asarray(k_bad), backend.asarray(v_bad),
                                       mask=backend.asarray(mask), q_chunk_size=chunks[0], kv_chunk_size=chunks[1])
    assert_close(got, backend.asarray(expected), rtol=TOL)


def test_hidden_keys_contribute_nothing_backward(backend):
    (q, k, v, d_out, mask), (k_bad, v_bad) = padded_problem(1)
    ref = torch_grads(q, k, v, d_out, mask=mask)
    got = scaled_dot_product_attention_vjp(*(backend.asarray(a) for a in (q, k_bad, v_bad, d_out)),
                                           mask=backend.asarray(mask), kv_chunk_size=3)
    for g, r in zip(got, ref):
        assert_close(g, backend.asarray(r), rtol=TOL)
    assert np.all(mha_cupy._backends.to_numpy(got[2])[0, 4:] == 0)  # hidden keys get no gradient


def test_hidden_keys_with_batch_invariant_and_causal():
    """Padded query rows (``batch_invariant``) see no key, so they hide nothing; causal hides the rest."""
    (q, k, v, _, mask), (k_bad, v_bad) = padded_problem(2, T=7)
    mask = np.broadcast_to(mask, (2, 7, 1, 7)).copy()  # per query: padded rows get the padding's fill
    for kw in (dict(batch_invariant=True), dict(is_causal=True), dict(batch_invariant=True, is_causal=True)):
        got = scaled_dot_product_attention(q, k_bad, v_bad, mask=mask, **kw)
        assert_close(got, naive_attention(q, k, v, mask=mask, is_causal=kw.get("is_causal", False)), rtol=TOL)


def test_hidden_keys_on_dask():
    da = require("dask.array")
    (q, k, v, _, mask), (k_bad, v_bad) = padded_problem(3, S=8)
    got = scaled_dot_product_attention(da.from_array(q, chunks=(1, 5, 4, 3)), da.from_array(k_bad, chunks=(1, 4, 2, 3)),
                                       da.from_array(v_bad, chunks=(1, 4, 2, 2)), mask=da.from_array(mask, chunks=(1, 1, 1, 4)))
    assert_close(got.compute(), naive_attention(q, k, v, mask=mask), rtol=TOL)


@pytest.mark.parametrize("batch_invariant", [False, True])
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)], ids=str)
def test_empty_batch_in_the_layer(backend, lead, batch_invariant):
    layer = MultiHeadAttention(emsize=8, nhead=2, d_k=4, d_v=4, xp=backend.xp, device=backend.device,
                               dtype=backend.dtype("float32"), seed=0)
    x = backend.asarray(np.zeros((*lead, 4, 8), np.float32))
    x_kv = backend.asarray(np.zeros((*lead, 6, 8), np.float32))
    kw = dict(batch_invariant=batch_invariant)
    for got in (layer(x, **kw), layer(x, x_kv, **kw), layer(x, x_kv, cache_kv=True, **kw), layer(x, use_cached_kv=True, **kw),
                layer(backend.xp.asarray(x, copy=True), save_peak_mem_factor=2, allow_inplace=True, **kw)):
        assert tuple(got.shape) == (*lead, 4, 8)
    dx, dx_kv, grads = layer.vjp(x, x, x_kv)
    assert tuple(dx.shape) == tuple(x.shape) and tuple(dx_kv.shape) == tuple(x_kv.shape)
    assert all(float(backend.xp.max(backend.xp.abs(g))) == 0.0 for g in grads.values())  # no rows: no gradient


def test_empty_batch_in_the_function_and_vjp(backend):
    q = backend.asarray(np.zeros((0, 3, 2, 4)))
    out, lse = scaled_dot_product_attention(q, q, q, return_lse=True)
    assert tuple(out.shape) == (0, 3, 2, 4) and tuple(lse.shape) == (0, 3, 2)
    assert [tuple(g.shape) for g in scaled_dot_product_attention_vjp(q, q, q, q)] == [(0, 3, 2, 4)] * 3
    assert tuple(scaled_dot_product_attention(q, q, q, batch_invariant=True).shape) == (0, 3, 2, 4)


def test_broadcast_overflow_names_n():
    torch = require("torch")
    with pytest.raises(ValueError, match=r"n=100000000000000000000"):
        mha_cupy.broadcast_kv_across_heads(torch.zeros((2, 3)), 10**20)
