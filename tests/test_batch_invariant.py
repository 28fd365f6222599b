"""batch_invariant=True: a row's result is bitwise the same whatever else is in the call.

Checked on NumPy and torch (CPU), the libraries whose BLAS picks kernels by matrix shape;
the values are checked against the independent float64 computation as well.
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_matches_reference, direct, naive_attention, require
from mha_cupy import MultiHeadAttention, scaled_dot_product_attention
from mha_cupy._backends import resolve_backend, to_numpy

LIBRARIES = ["numpy", "torch"]


def host(a):
    return np.asarray(to_numpy(a))


def lib(name):
    if name == "torch":
        require("torch")
    return resolve_backend(name)


@pytest.mark.parametrize("name", LIBRARIES)
def test_attention_rows_do_not_depend_on_the_rest_of_the_call(name):
    be = lib(name)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((3, 300, 6, 32), (3, 700, 2, 32), (3, 700, 2, 32)))
    Q, Kk, Vv = (be.from_numpy(a, be.default_device()) for a in (q, k, v))
    whole = host(scaled_dot_product_attention(Q, Kk, Vv, batch_invariant=True))
    variants = {
        "7 queries": (scaled_dot_product_attention(Q[:, :7], Kk, Vv, batch_invariant=True), np.s_[:, :7]),
        "queries 130:137": (scaled_dot_product_attention(Q[:, 130:137], Kk, Vv, batch_invariant=True), np.s_[:, 130:137]),
        "one batch row": (scaled_dot_product_attention(Q[1:2], Kk[1:2], Vv[1:2], batch_invariant=True), np.s_[1:2]),
        "chunks and workers": (scaled_dot_product_attention(Q, Kk, Vv, batch_invariant=True, q_chunk_size=5,
                                                           kv_chunk_size=33, workers=1, memory_budget="1MiB"), np.s_[:]),
    }
    for what, (got, rows) in variants.items():
        np.testing.assert_array_equal(host(got), whole[rows], err_msg=what)
    assert_matches_reference(be.from_numpy(whole, be.default_device()), naive_attention(q, k, v), xp=be.xp, dtype=be.xp.float32)


@pytest.mark.parametrize("name", LIBRARIES)
def test_causal_with_lse_and_dropout(name):
    be = lib(name)
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 70, 4, 8)).astype(np.float32) for _ in range(3))
    Q, Kk, Vv = (be.from_numpy(a, be.default_device()) for a in (q, k, v))
    kw = dict(batch_invariant=True, return_lse=True, dropout_p=0.2, seed=3)
    out, lse = scaled_dot_product_attention(Q, Kk, Vv, **kw)
    part, part_lse = scaled_dot_product_attention(Q[1:], Kk[1:], Vv[1:], **kw)
    # Dropout counters use the row's batch index: batch row 1 alone is batch row 0 of that call.
    assert host(out).shape == (2, 70, 4, 8) and host(lse).shape == (2, 70, 4)
    np.testing.assert_array_equal(host(part_lse), host(lse)[1:])
    plain_out = host(scaled_dot_product_attention(Q, Kk, Vv, batch_invariant=True, is_causal=True))
    np.testing.assert_allclose(plain_out, naive_attention(q, k, v, is_causal=True), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", LIBRARIES)
def test_layer_rows_do_not_depend_on_the_rest_of_the_call(name):
    be = lib(name)
    rng = np.random.default_rng(2)
    layer = MultiHeadAttention(emsize=48, nhead=6, d_k=8, d_v=8, seed=4, xp=be.xp)
    x = rng.standard_normal((4, 300, 48)).astype(np.float32)
    x_kv = rng.standard_normal((4, 520, 48)).astype(np.float32)
    X, XKV = (be.from_numpy(a, be.default_device()) for a in (x, x_kv))
    whole = host(layer(X, XKV, batch_invariant=True))
    np.testing.assert_array_equal(host(layer(X[:, :7], XKV, batch_invariant=True)), whole[:, :7])
    np.testing.assert_array_equal(host(layer(X[2:3, 50:61], XKV[2:3], batch_invariant=True)), whole[2:3, 50:61])
    factor = layer(be.xp.asarray(X, copy=True), XKV, batch_invariant=True, save_peak_mem_factor=3, allow_inplace=True)
    np.testing.assert_array_equal(host(factor), whole)
    assert_matches_reference(be.from_numpy(whole, be.default_device()), direct(layer, x, x_kv), xp=be.xp, dtype=be.xp.float32)


@pytest.mark.parametrize("name", LIBRARIES)
@pytest.mark.parametrize("dims", [(5, 7), (8, 9), (32, 5), (3, 16)], ids=str)
def test_any_head_sizes_and_any_query_offsets(name, dims):
    """Rows land at other positions of their tiles in a sub-call; torch's GEMMs then differ unless the
    output columns are padded to a multiple of 16 (what this checks, with odd head sizes)."""
    be = lib(name)
    H, V = dims
    rng = np.random.default_rng(H * 100 + V)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((2, 200, 4, H), (2, 600, 2, H), (2, 600, 2, V)))
    Q, Kk, Vv = (be.from_numpy(a, be.default_device()) for a in (q, k, v))
    whole = host(scaled_dot_product_attention(Q, Kk, Vv, batch_invariant=True))
    for lo, hi in ((3, 40), (100, 101), (0, 1), (7, 199), (150, 152)):
        got = host(scaled_dot_product_attention(Q[:, lo:hi], Kk, Vv, batch_invariant=True))
        np.testing.assert_array_equal(got, whole[:, lo:hi], err_msg=f"queries {lo}:{hi}")
    layer = MultiHeadAttention(emsize=4 * V, nhead=4, d_k=H, d_v=V, seed=1, xp=be.xp)
    x = be.from_numpy(rng.standard_normal((3, 150, 4 * V)).astype(np.float32), be.default_device())
    x_kv = be.from_numpy(rng.standard_normal((3, 530, 4 * V)).astype(np.float32), be.default_device())
    full = host(layer(x, x_kv, batch_invariant=True))
    for lo, hi in ((3, 40), (100, 101), (7, 149)):
        np.testing.assert_array_equal(host(layer(x[:, lo:hi], x_kv, batch_invariant=True)), full[:, lo:hi])


@pytest.mark.parametrize("name, dtype", [("numpy", "float16"), ("torch", "float16"), ("torch", "bfloat16")])
def test_half_precision_layer_rows_and_accuracy(name, dtype):
    """Half precisions: the fixed-order products run in float32 (16-bit partial sums would lose a digit), so
    batch_invariant keeps the accuracy of an ordinary call and its rows their bits."""
    be = lib(name)
    rng = np.random.default_rng(7)
    layer = MultiHeadAttention(emsize=64, nhead=4, d_k=16, d_v=16, seed=3, xp=be.xp, dtype=dtype)
    X, XKV = (be.xp.astype(be.from_numpy(rng.standard_normal(s).astype(np.float32), be.default_device()), layer.dtype)
              for s in ((3, 40, 64), (3, 50, 64)))
    whole = layer(X, XKV, batch_invariant=True)
    np.testing.assert_array_equal(host(layer(X[1:2, 5:9], XKV[1:2], batch_invariant=True)).astype(np.float32),
                                  host(whole)[1:2, 5:9].astype(np.float32))
    exact = direct(layer, host(X).astype(np.float64), host(XKV).astype(np.float64))
    err_invariant = np.abs(host(whole).astype(np.float64) - exact).max()
    err_plain = np.abs(host(layer(X, XKV)).astype(np.float64) - exact).max()
    assert err_invariant <= 2 * err_plain, (err_invariant, err_plain)


@pytest.mark.parametrize("name", LIBRARIES)
@pytest.mark.parametrize("causal", [False, True], ids=["lengths", "causal-lengths"])
def test_rows_with_their_own_key_lengths_do_not_depend_on_the_other_rows(name, causal):
    """A batch row with its own ``kv_seq_lengths`` gives the same bits alone as beside rows with other lengths: the
    key chunks a row goes through end on the chunk grid, not where the longest row of its block ends (which made
    a row's last sum run over another length)."""
    be = lib(name)
    rng = np.random.default_rng(7)
    B, T, S = 4, 300, 600
    q = rng.standard_normal((B, T, 2, 16)).astype(np.float32)
    k, v = (rng.standard_normal((B, S, 2, 16)).astype(np.float32) for _ in range(2))
    lengths = np.array([600, 437, 212, 1])
    Q, Kk, Vv = (be.from_numpy(a, be.default_device()) for a in (q, k, v))
    kw = dict(batch_invariant=True, is_causal=causal)
    whole = host(scaled_dot_product_attention(Q, Kk, Vv, kv_seq_lengths=be.from_numpy(lengths, be.default_device()),
                                              **kw))
    for b in range(B):
        alone = scaled_dot_product_attention(Q[b:b + 1], Kk[b:b + 1], Vv[b:b + 1],
                                             kv_seq_lengths=be.from_numpy(lengths[b:b + 1], be.default_device()), **kw)
        np.testing.assert_array_equal(host(alone), whole[b:b + 1], err_msg=f"batch row {b}")
        keys = np.arange(S) < lengths[b]
        seen = keys & (np.arange(S)[None, :] <= np.arange(T)[:, None] + lengths[b] - T if causal else np.ones((T, 1), bool))
        expected = naive_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], mask=seen[None, :, None, :])
        rows = seen.any(axis=1)  # rows that see no key give 0 (the reference has NaN there)
        np.testing.assert_allclose(whole[b][rows], expected[0][rows], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(), dict(is_causal=True), dict(local_window_size=(40, 3)), dict(mask=True),
                                dict(kv_seq_lengths=True)], ids=["plain", "causal", "window", "mask", "lengths"])
def test_fused_kernel_gives_the_bits_of_the_step_by_step_invariant_path(kw, monkeypatch):
    """NumPy with numba runs the invariant chunk step as one kernel over the budget's query blocks; without it
    (torch, or numba off) it runs step by step over tiles of 32 padded queries. Both give the same bits."""
    require("numba")
    from mha_cupy._backends import NumpyBackend, _numba

    if _numba.load() is None:
        pytest.skip("MHA_CUPY_NUMBA=0 is set: the compiled kernels are off")
    rng = np.random.default_rng(8)
    q, k, v = (rng.standard_normal((2, 700, 4, 24)).astype(np.float32) for _ in range(3))
    if kw.get("mask"):
        kw = dict(mask=rng.random((2, 1, 1, 700)) > 0.3)
    if kw.get("kv_seq_lengths"):
        kw = dict(kv_seq_lengths=np.array([700, 333]))
    ran = []
    real = NumpyBackend.attend_chunk
    monkeypatch.setattr(NumpyBackend, "attend_chunk", lambda self, *a, **k: ran.append(1) or real(self, *a, **k))
    fused = scaled_dot_product_attention(q, k, v, batch_invariant=True, **kw)
    assert ran, "the fused kernel did not run"
    monkeypatch.setattr(NumpyBackend, "fuses_fixed_order", lambda self, dtype: False)
    monkeypatch.setattr(NumpyBackend, "attend_chunk", lambda self, *a, **k: False)
    np.testing.assert_array_equal(fused, scaled_dot_product_attention(q, k, v, batch_invariant=True, **kw))


@pytest.mark.parametrize("name", LIBRARIES)
def test_a_row_does_not_depend_on_how_far_the_calls_keys_run(name):
    """The keys past a row's own length are padding whose extent the other rows set: a row with L keys gives
    the same bits whatever the padded key length S (its last chunk's sums always run over the grid's 512)."""
    be = lib(name)
    rng = np.random.default_rng(9)
    q = rng.standard_normal((2, 9, 2, 8)).astype(np.float32)
    k, v = (rng.standard_normal((2, 1100, 2, 8)).astype(np.float32) for _ in range(2))
    Q, Kk, Vv = (be.from_numpy(a, be.default_device()) for a in (q, k, v))
    for L in (200, 511, 513):
        outs = [host(scaled_dot_product_attention(Q, Kk[:, :S], Vv[:, :S], batch_invariant=True,
                                                  kv_seq_lengths=be.from_numpy(np.array([L, S]), be.default_device())))[0]
                for S in (L, 600, 1024, 1100) if S >= L]
        for got in outs[1:]:
            np.testing.assert_array_equal(got, outs[0], err_msg=f"L={L}")
        expected = naive_attention(q[:1], k[:1, :L], v[:1, :L])
        np.testing.assert_allclose(outs[0], expected[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(mask="keys"), dict(q_seq_lengths=True), dict(head_size=0), dict(half=True)],
                         ids=["mask broadcast over keys", "query lengths", "head size 0", "float16 causal"])
def test_invariant_calls_of_every_shape_match_the_float64_reference(kw):
    """Shapes the fused kernel must read right: a mask of one key column, the query-length condition (which has
    one), head size 0, and float16 (computed in float32, through the kernel too)."""
    rng = np.random.default_rng(10)
    H = 0 if kw.get("head_size") == 0 else 8
    dt = np.float16 if kw.get("half") else np.float32
    q = rng.standard_normal((2, 37, 2, H)).astype(dt)
    k = rng.standard_normal((2, 600, 2, H)).astype(dt)
    v = rng.standard_normal((2, 600, 2, 4)).astype(dt)
    call, ref = {}, {"scale": 1.0} if H == 0 else {}  # head size 0: the scale is 1 (no 1 / sqrt(0)), scores 0
    if kw.get("mask"):
        call["mask"] = ref["mask"] = rng.random((2, 37, 2, 1)) > 0.4
    if kw.get("q_seq_lengths"):
        call["q_seq_lengths"] = ref["q_lengths"] = np.array([30, 5])
    if kw.get("half"):
        call["is_causal"] = ref["is_causal"] = True
    got = scaled_dot_product_attention(q, k, v, batch_invariant=True, **call)
    expected = naive_attention(q, k, v, **ref)
    tol = 2 * 2.0**-10 if kw.get("half") else 1e-5
    np.testing.assert_allclose(got.astype(np.float64), np.nan_to_num(expected), rtol=0, atol=tol)
