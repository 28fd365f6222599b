"""The chunked core against a direct float64 computation and PyTorch's SDPA."""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import assert_matches_reference, keep_mask, naive_attention, require
import mha_cupy
from mha_cupy import MultiHeadAttention
from mha_cupy import scaled_dot_product_attention as sdpa
from mha_cupy._backends import resolve_backend, to_numpy


def data(seed, B=2, T=7, S=9, N=6, K=2, H=5, V=3, dtype="float64"):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, N, H)).astype(dtype)
    k = rng.standard_normal((B, S, K, H)).astype(dtype)
    v = rng.standard_normal((B, S, K, V)).astype(dtype)
    return q, k, v


CHUNKINGS = [(None, None), (1, 1), (3, 4), (2, 100), (7, 2), (4, 9)]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("chunks", CHUNKINGS, ids=str)
def test_matches_direct_computation_at_every_chunking(backend, dtype, chunks):
    q, k, v = data(1, dtype=dtype)
    expected = naive_attention(q, k, v)
    got = sdpa(*(backend.asarray(a) for a in (q, k, v)), q_chunk_size=chunks[0], kv_chunk_size=chunks[1])
    tol = 1e-12 if dtype == "float64" else 1e-6
    assert_matches_reference(got, expected, xp=backend.xp, dtype=backend.dtype(dtype), device=backend.device, tol=tol)


@pytest.mark.parametrize("chunks", CHUNKINGS[1:], ids=str)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_chunked_and_unchunked_both_equal_direct(backend, chunks, dtype):
    host = data(2, B=3, T=11, S=13, dtype=dtype)
    q, k, v = (backend.asarray(a) for a in host)
    expected = naive_attention(*host)
    tol = 1e-12 if dtype == "float64" else 1e-6
    for qc, kc in ((11, 13), chunks):
        got = sdpa(q, k, v, q_chunk_size=qc, kv_chunk_size=kc)
        assert_matches_reference(got, expected, xp=backend.xp, dtype=backend.dtype(dtype), tol=tol, what=f"chunks {qc}, {kc}")


@pytest.mark.parametrize("T,S", [(5, 5), (3, 8), (8, 3)])
@pytest.mark.parametrize("chunks", [(None, None), (2, 3), (1, 1)], ids=str)
def test_causal_bottom_right(backend, T, S, chunks):
    q, k, v = data(3, T=T, S=S)
    expected = naive_attention(q, k, v, is_causal=True)
    got = sdpa(*(backend.asarray(a) for a in (q, k, v)), is_causal=True, q_chunk_size=chunks[0], kv_chunk_size=chunks[1])
    assert_matches_reference(got, expected, xp=backend.xp, dtype=backend.xp.float64, tol=1e-12)
    if T > S:  # the first T - S queries see no key: zeros, never NaN
        assert np.all(to_numpy(got)[:, : T - S] == 0)


@pytest.mark.parametrize("shape", [(2, 7, 6, 9), (7, 1, 9), (1, 9), (2, 1, 1, 1), (6, 1)])
def test_mask_and_bias_broadcast(backend, shape):
    q, k, v = data(4)
    rng = np.random.default_rng(5)
    mask = rng.random(shape) > 0.3
    bias = rng.standard_normal(shape)
    expected = naive_attention(q, k, v, mask=mask, bias=bias)
    got = sdpa(*(backend.asarray(a) for a in (q, k, v)), mask=backend.asarray(mask), bias=backend.asarray(bias),
               q_chunk_size=3, kv_chunk_size=4)
    assert_matches_reference(got, expected, xp=backend.xp, dtype=backend.xp.float64, tol=1e-12)


def test_fully_masked_rows_are_zero(backend):
    q, k, v = data(6)
    mask = np.ones((2, 7, 6, 9), dtype=bool)
    mask[0, 3] = False
    mask[1, :, 2] = False
    got = to_numpy(sdpa(*(backend.asarray(a) for a in (q, k, v)), mask=backend.asarray(mask), kv_chunk_size=2))
    assert np.all(np.isfinite(got))
    assert np.all(got[0, 3] == 0) and np.all(got[1, :, 2] == 0)
    np.testing.assert_allclose(got, naive_attention(q, k, v, mask=mask), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_huge_logits_do_not_overflow(backend, dtype):
    q, k, v = data(7, dtype=dtype)
    q = q * 100.0  # logits of order 1e4
    k = k * 100.0
    got = sdpa(*(backend.asarray(a) for a in (q, k, v)), kv_chunk_size=2)
    assert np.all(np.isfinite(to_numpy(got)))
    assert_matches_reference(got, naive_attention(q, k, v), xp=backend.xp, dtype=backend.dtype(dtype), tol=1e-3 if dtype == "float32" else 1e-9)


def test_scale(backend):
    q, k, v = data(8)
    got = sdpa(*(backend.asarray(a) for a in (q, k, v)), scale=0.37)
    assert_matches_reference(got, naive_attention(q, k, v, scale=0.37), xp=backend.xp, dtype=backend.xp.float64, tol=1e-12)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_computes_in_float32(backend, dtype):
    if not hasattr(backend.xp, dtype):  # the library lacks it: asking for it is a clear error
        with pytest.raises(TypeError, match=f"dtype must be one of the floating dtypes .* got '{dtype}'"):
            MultiHeadAttention(emsize=8, nhead=2, d_k=4, d_v=4, dtype=dtype, xp=backend.xp)
        return

    q, k, v = data(11, T=33, S=40)
    low = [backend.asarray(a) for a in (q, k, v)]
    low = [backend.xp.astype(a, backend.dtype(dtype)) for a in low]
    got = sdpa(*low, kv_chunk_size=7, is_causal=True)
    # The reference sees the same rounded inputs, in float64.
    expected = naive_attention(*(to_numpy(a) for a in low), is_causal=True)
    assert_matches_reference(got, expected, xp=backend.xp, dtype=backend.dtype(dtype), device=backend.device)


class CountingMatmul:
    """NumPy's namespace, counting matrix products."""

    def __init__(self):
        self.calls = []
        self.base = resolve_backend("numpy").xp

    def __getattr__(self, name):
        return getattr(self.base, name)

    def matmul(self, a, b):
        self.calls.append(a.shape)
        return self.base.matmul(a, b)


def test_causal_skips_hidden_chunks():
    from mha_cupy._backends import NumpyBackend
    from mha_cupy._plan import ChunkPlan
    from mha_cupy._core import attend
    from mha_cupy._plan import AttentionPlan

    counting = CountingMatmul()
    be = type("FreshTiles", (NumpyBackend,), {"matmul_writes_out": False})(counting)  # every product via xp.matmul
    q, k, v = data(14, B=1, T=64, S=64, N=2, K=1)
    plan = AttentionPlan(scale=0.5, chunks=ChunkPlan(batch=1, q=8, kv=8), workers=1, is_causal=True)
    out = attend(q, k, v, be=be, plan=plan)
    assert len(counting.calls) == 2 * sum(range(1, 9))  # query block i sees key blocks 0..i only
    np.testing.assert_allclose(out, naive_attention(q, k, v, scale=0.5, is_causal=True), rtol=0, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 3), T=st.integers(1, 12), S=st.integers(1, 12), K=st.integers(1, 3), G=st.integers(1, 3),
    qc=st.integers(1, 13), kc=st.integers(1, 13), causal=st.booleans(), seed=st.integers(0, 2**16),
)
def test_any_chunking_equals_direct(B, T, S, K, G, qc, kc, causal, seed):
    q, k, v = data(seed, B=B, T=T, S=S, N=K * G, K=K, H=3, V=2)
    got = sdpa(q, k, v, q_chunk_size=qc, kv_chunk_size=kc, is_causal=causal)
    np.testing.assert_allclose(got, naive_attention(q, k, v, is_causal=causal), rtol=0, atol=1e-12)


def test_empty_key_set_gives_zeros():
    q, k, v = data(9, S=0)
    out = sdpa(q, k, v)
    assert out.shape == (2, 7, 6, 3) and np.all(out == 0)


@pytest.mark.parametrize("workers", [1, 2, 5])
def test_workers_do_not_change_results(backend, workers):
    q, k, v = data(12, B=3, T=17, S=19)
    arrays = [backend.asarray(a) for a in (q, k, v)]
    one = sdpa(*arrays, q_chunk_size=4, kv_chunk_size=5, workers=1, dropout_p=0.2, seed=4)
    many = sdpa(*arrays, q_chunk_size=4, kv_chunk_size=5, workers=workers, dropout_p=0.2, seed=4)
    np.testing.assert_array_equal(to_numpy(many), to_numpy(one))  # same blocks, same arithmetic
    expected = naive_attention(q, k, v, keep=keep_mask(4, 0.2, 3, 6, 17, 19), dropout_p=0.2)
    assert_matches_reference(many, expected, xp=backend.xp, dtype=backend.xp.float64, tol=1e-12)


def test_default_workers_and_blas_limit_restored():
    import os

    from threadpoolctl import threadpool_info

    assert resolve_backend("numpy").default_workers("cpu") == max(1, os.cpu_count() or 1)
    before = [i["num_threads"] for i in threadpool_info()]
    q, k, v = data(13, T=40, S=40)
    expected = naive_attention(q, k, v)
    np.testing.assert_allclose(sdpa(q, k, v, q_chunk_size=8, workers=2), expected, rtol=0, atol=1e-12)
    assert [i["num_threads"] for i in threadpool_info()] == before


# -- against PyTorch's own SDPA ------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_matches_torch_sdpa(seed):
    torch = require("torch", reason="needs torch")
    from torch.nn.attention.bias import causal_lower_right

    rng = np.random.default_rng(seed)
    K = int(rng.integers(1, 4))
    N = K * int(rng.integers(1, 4))
    B, T, S, H, V = (int(n) for n in rng.integers(1, 9, size=5))
    q, k, v = data(seed, B=B, T=T, S=S, N=N, K=K, H=H, V=V)
    tq, tk, tv = (torch.from_numpy(a).transpose(1, 2) for a in (q, k, v))
    kind = seed % 3
    kwargs, theirs = {}, {}
    if kind == 1:
        mask = rng.random((B, T, N, S)) > 0.2
        mask[..., 0] = True  # torch returns NaN on fully masked rows
        kwargs["mask"] = mask
        theirs["attn_mask"] = torch.from_numpy(mask).transpose(1, 2)
    elif kind == 2 and T == S:
        kwargs["is_causal"] = True
        theirs["is_causal"] = True
    elif kind == 2 and T < S:
        kwargs["is_causal"] = True
        theirs["attn_mask"] = causal_lower_right(T, S)
    expected = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True, **theirs)
    got = sdpa(q, k, v, q_chunk_size=int(rng.integers(1, 5)), kv_chunk_size=int(rng.integers(1, 5)), **kwargs)
    assert_matches_reference(got, expected.transpose(1, 2).numpy(), xp=resolve_backend("numpy").xp, dtype=np.float64)


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, r"q must have 4 dimensions"),
        (lambda q, k, v: (q, k[:, :, :, :2], v), ValueError, r"k must have shape \[2, \*, \*, 5\]"),
        (lambda q, k, v: (q, k, v[:, :3]), ValueError, r"v must have shape \[2, 9, 2, \*\]"),
        (lambda q, k, v: (q, k.astype("float32"), v), TypeError, r"k must have dtype float64, got float32"),
        (lambda q, k, v: (q.astype("int64"), k, v), TypeError, r"q must have a real floating dtype, got int64"),
        (lambda q, k, v: (q[:, :, :5], k, v), ValueError, r"multiple of k/v heads: q has 5 heads, got k/v with 2; arrays are \[B, T, N, H\] \(from torch's "
         r"\[B, N, T, H\]: \.permute\(0, 2, 1, 3\)\)"),
        (lambda q, k, v: (q.tolist(), k, v), TypeError, r"q must be an array"),
    ],
)
def test_bad_arrays(change, exc, match):
    q, k, v = data(0)
    with pytest.raises(exc, match=match):
        sdpa(*change(q, k, v))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(q_chunk_size=0), ValueError, "q_chunk_size must be an int >= 1, got 0"),
        (dict(kv_chunk_size=-3), ValueError, "kv_chunk_size must be an int >= 1, got -3"),
        (dict(q_chunk_size=2.5), TypeError, "q_chunk_size must be an int"),
        (dict(kv_chunk_size=True), TypeError, "kv_chunk_size must be an int"),
        (dict(memory_budget=10), ValueError, "memory_budget of 10 bytes is too small for one query row"),
        (dict(memory_budget="lots"), ValueError, "memory_budget must look like"),
        (dict(memory_budget=-1), ValueError, "memory_budget must be an int >= 1, got -1"),
        (dict(dropout_p=1.5), ValueError, r"dropout_p must be a float in \[0, 1\], got 1.5"),
        (dict(scale=float("nan")), ValueError, "scale must be a finite float"),
        (dict(scale="big"), TypeError, "scale must be a finite float"),
        (dict(is_causal=1), TypeError, "is_causal must be a bool"),
        (dict(workers=0), ValueError, "workers must be an int >= 1, got 0"),
        (dict(workers=1.0), TypeError, "workers must be an int"),
        (dict(seed=-1, dropout_p=0.1), ValueError, "seed must be an int in"),
        (dict(mask=np.ones((7, 6, 9))), TypeError, "mask must be a bool array"),
        (dict(mask=np.ones((3, 9), dtype=bool)), ValueError, r"mask must broadcast to \[batch, q_len, heads, kv_len\] = \[2, 7, 6, 9\], got shape \[3, 9\]"),
        (dict(bias=np.ones((9,), dtype="float32")), TypeError, "bias must have the dtype of q"),
    ],
)
def test_bad_keywords(kwargs, exc, match):
    q, k, v = data(0)
    with pytest.raises(exc, match=match):
        sdpa(q, k, v, **kwargs)


def test_mixed_namespaces_and_devices_are_refused():
    xps = require("array_api_strict")
    q, k, v = data(0)
    with pytest.raises(TypeError, match="one array library"):
        sdpa(q, xps.asarray(k), v)
    dev = xps.Device("device1")
    with pytest.raises(ValueError, match="one device"):
        sdpa(xps.asarray(q), xps.asarray(k, device=dev), xps.asarray(v))


def test_inputs_are_not_modified():
    q, k, v = data(0)
    copies = [a.copy() for a in (q, k, v)]
    sdpa(q, k, v, q_chunk_size=2, kv_chunk_size=3, dropout_p=0.2, seed=1)
    for a, b in zip((q, k, v), copies):
        np.testing.assert_array_equal(a, b)


# -- log-sum-exp and split keys ------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(), dict(is_causal=True), dict(mask=True), dict(bias=True)],
                         ids=["plain", "causal", "mask", "bias"])
def test_return_lse_equals_direct_computation(backend, kw):
    from helpers import naive_lse

    q, k, v = data(21, T=6, S=9)
    rng = np.random.default_rng(22)
    host = {}
    if kw.get("mask"):
        host["mask"] = rng.random((2, 6, 6, 9)) > 0.4
        host["mask"][0, 2] = False  # a row with no visible key: lse -inf, output 0
    if kw.get("bias"):
        host["bias"] = rng.standard_normal((6, 6, 9))
    extra = {name: backend.asarray(a) for name, a in host.items()}
    causal = kw.get("is_causal", False)
    out, lse = sdpa(*(backend.asarray(a) for a in (q, k, v)), is_causal=causal, return_lse=True,
                    q_chunk_size=4, kv_chunk_size=4, **extra)
    expected = naive_lse(q, k, is_causal=causal, **host)
    assert tuple(lse.shape) == (2, 6, 6) and lse.dtype == backend.xp.float64
    got = to_numpy(lse)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=0, atol=1e-12 * max(1.0, np.abs(expected[finite]).max()))
    assert_matches_reference(out, naive_attention(q, k, v, is_causal=causal, **host), xp=backend.xp, dtype=backend.xp.float64,
                 tol=1e-12)


def test_lse_is_float32_for_half_and_single_precision():
    q, k, v = (a.astype(np.float32) for a in data(23))
    _, lse = sdpa(q, k, v, return_lse=True)
    assert lse.dtype == np.float32


@pytest.mark.parametrize("kw", [dict(), dict(is_causal=True), dict(dropout_p=0.3, seed=9)], ids=["plain", "causal", "dropout"])
def test_keys_split_across_workers_when_blocks_are_few(kw):
    from mha_cupy._backends import resolve_backend
    from mha_cupy._plan import Problem, Sizes, plan_attention

    q, k, v = data(24, B=1, T=3, S=200, N=4, K=1, H=8, V=5)
    plan = plan_attention(Problem(be=resolve_backend("numpy"), device="cpu", dtype=np.float64,
                                  sizes=Sizes(1, 3, 200, 4, 1, 8, 5), scale=0.3, workers=4, budget=32 * 2**20,
                                  kv_chunk=16, dropout_p=kw.get("dropout_p", 0.0), seed=kw.get("seed")))
    assert plan.key_splits == 4 and plan.key_ranges(0, 200) == [(0, 64), (64, 128), (128, 192), (192, 200)]
    keep = keep_mask(9, 0.3, 1, 4, 3, 200) if "seed" in kw else None
    expected = naive_attention(q, k, v, is_causal=kw.get("is_causal", False), keep=keep, dropout_p=kw.get("dropout_p", 0.0))
    first = sdpa(q, k, v, kv_chunk_size=16, workers=4, **kw)
    for _ in range(5):  # partial results merge in key order, whichever worker finishes first
        np.testing.assert_array_equal(sdpa(q, k, v, kv_chunk_size=16, workers=4, **kw), first)
    for workers in (1, 2, 4):
        got, lse = sdpa(q, k, v, kv_chunk_size=16, workers=workers, return_lse=True, **kw)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
        from helpers import naive_lse

        np.testing.assert_allclose(lse, naive_lse(q, k, is_causal=kw.get("is_causal", False)), rtol=0, atol=1e-12)


# -- quantized keys and values (k_scale, v_scale) -----------------------------------------------------------------


def quantized(seed, *, B=3, S=37, K=2, H=5, V=3, per_row=True):
    """int8 keys and values with their scales (TabPFN 9's symmetric scheme), and what they stand for in float64."""
    rng = np.random.default_rng(seed)
    k8 = rng.integers(-127, 128, (B, S, K, H), dtype=np.int8)
    v8 = rng.integers(-127, 128, (B, S, K, V), dtype=np.int8)
    k_scale = (rng.uniform(0.005, 0.02, (B, 1, 1, 1)) if per_row else np.full((), 0.01)).astype(np.float32)
    v_scale = np.float32(0.015)
    return k8, v8, k_scale, v_scale, k8 * k_scale.astype(np.float64), v8 * np.float64(v_scale)


@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("chunks", [(None, None), (2, 5), (3, 36)], ids=str)
def test_quantized_kv_equal_direct_computation_over_the_dequantized_cache(backend, per_row, chunks):
    k8, v8, k_scale, v_scale, k, v = quantized(5, per_row=per_row)
    q = np.random.default_rng(6).standard_normal((3, 7, 6, 5)).astype(np.float32)
    mask = np.random.default_rng(7).random((3, 7, 1, 37)) < 0.8
    expected = naive_attention(q.astype(np.float64), k, v, mask=mask)
    got = sdpa(backend.asarray(q), backend.asarray(k8), backend.asarray(v8), k_scale=backend.asarray(k_scale),
               v_scale=float(v_scale), mask=backend.asarray(mask), q_chunk_size=chunks[0], kv_chunk_size=chunks[1])
    assert_matches_reference(got, expected, xp=backend.xp, dtype=backend.xp.float32, tol=1e-5)


def test_float8_kv_where_the_library_has_it(backend):
    """float8_e4m3fn keys and values (NumPy's through ml_dtypes), against float64 over what they hold."""
    if "float8_e4m3fn" not in backend.adapter.quantized_dtypes():
        pytest.skip(f"{backend.name} has no float8_e4m3fn dtype")
    xp, rng = backend.xp, np.random.default_rng(8)
    q = rng.standard_normal((2, 6, 4, 8)).astype(np.float32)
    k8, v8 = (xp.astype(backend.asarray(rng.uniform(-400, 400, (2, 50, 2, 8)).astype(np.float32)),
                        backend.adapter.quantized_dtypes()["float8_e4m3fn"]) for _ in range(2))
    held_k, held_v = (to_numpy(xp.astype(a, xp.float32)).astype(np.float64) for a in (k8, v8))
    expected = naive_attention(q.astype(np.float64), held_k * (0.25 / 448), held_v * (1 / 448))
    got = sdpa(backend.asarray(q), k8, v8, k_scale=0.25 / 448, v_scale=1 / 448, kv_chunk_size=16)
    assert_matches_reference(got, expected, xp=xp, dtype=xp.float32, tol=1e-5)


def test_quantized_kv_dequantized_one_chunk_at_a_time(monkeypatch):
    from mha_cupy._core import ChunkLoop

    seen = []
    original = ChunkLoop.dequantize
    monkeypatch.setattr(ChunkLoop, "dequantize", lambda self, chunk, scale, bsl, ssl: (
        seen.append(chunk.shape[1]), original(self, chunk, scale, bsl, ssl))[1])
    k8, v8, k_scale, v_scale, k, v = quantized(9, S=1000)
    q = np.random.default_rng(10).standard_normal((3, 4, 6, 5)).astype(np.float32)
    sdpa(q, k8, v8, k_scale=k_scale, v_scale=v_scale, kv_chunk_size=128)
    assert max(seen) <= 128 and len(seen) >= 2 * 1000 // 128  # keys and values, chunk by chunk


def test_quantized_kv_batch_invariant_rows():
    k8, v8, k_scale, v_scale, _, _ = quantized(11, B=4, S=700)
    q = np.random.default_rng(12).standard_normal((4, 45, 6, 5)).astype(np.float32)
    whole = sdpa(q, k8, v8, k_scale=k_scale, v_scale=v_scale, batch_invariant=True)
    part = sdpa(q[1:3, 10:13], k8[1:3], v8[1:3], k_scale=k_scale[1:3], v_scale=v_scale, batch_invariant=True)
    assert np.array_equal(part, whole[1:3, 10:13])


@pytest.mark.parametrize(("change", "error", "words"), [
    ({"k_scale": None}, TypeError, "pass its dequantization scale as k_scale"),
    ({"k": "float"}, TypeError, "k must have a quantized dtype"),
    ({"k_scale": np.ones((2, 1, 1, 1), np.float32)}, ValueError, r"n 1 or the batch 3, got \[2, 1, 1, 1\]"),
    ({"k_scale": np.ones((3, 1), np.float32)}, ValueError, "k_scale must have shape"),
    ({"k_scale": np.array([1.0, np.nan, 1.0], np.float32)}, ValueError, "k_scale must be finite"),
    ({"k_scale": np.ones(3, np.int32)}, TypeError, "k_scale must have a real floating dtype"),
    ({"v_scale": float("inf")}, ValueError, "v_scale must be a finite float"),
    ({"v_scale": True}, TypeError, "v_scale must be a finite float"),
])
def test_quantized_kv_refusals(change, error, words):
    k8, v8, k_scale, v_scale, _, _ = quantized(13)
    q = np.random.default_rng(14).standard_normal((3, 4, 6, 5)).astype(np.float32)
    args = {"k": k8, "v": v8, "k_scale": k_scale, "v_scale": v_scale, **change}
    if isinstance(args["k"], str):
        args["k"] = k8.astype(np.float32)
    before = [a.copy() for a in (q, k8, v8, k_scale)]
    with pytest.raises(error, match=words):
        sdpa(q, args.pop("k"), args.pop("v"), **args)
    assert all(np.array_equal(a, b) for a, b in zip(before, (q, k8, v8, k_scale)))


def test_quantized_kv_refused_with_gradients_and_on_dask():
    torch = require("torch")
    da = require("dask.array")
    k8, v8, k_scale, v_scale, _, _ = quantized(15)
    q = np.random.default_rng(16).standard_normal((3, 4, 6, 5)).astype(np.float32)
    with pytest.raises(TypeError, match="take no gradients"):
        sdpa(torch.tensor(q, requires_grad=True), torch.tensor(k8), torch.tensor(v8), k_scale=1.0, v_scale=1.0)
    with pytest.raises(TypeError, match="do not take dask arrays yet"):
        sdpa(da.from_array(q), da.from_array(k8), da.from_array(v8), k_scale=1.0, v_scale=1.0)


# -- variable lengths, sliding windows, soft-capping ---------------------------------------------------------------

LENGTHS = {"q": np.array([9, 4, 0]), "kv": np.array([13, 7, 3])}
OPTIONS = {
    "lengths": dict(q_seq_lengths="q", kv_seq_lengths="kv"),
    "kv lengths causal": dict(kv_seq_lengths="kv", is_causal=True),
    "lengths causal window": dict(q_seq_lengths="q", kv_seq_lengths="kv", is_causal=True, local_window_size=3),
    "window (2, 1)": dict(local_window_size=(2, 1)),
    "window 0": dict(local_window_size=0),
    "softcap": dict(softcap=0.7),
    "softcap bias mask lengths": dict(softcap=1.5, bias=True, mask=True, kv_seq_lengths="kv"),
}


REF_NAMES = {"q_seq_lengths": "q_lengths", "kv_seq_lengths": "kv_lengths", "local_window_size": "window"}


def options_for(name, backend=None, T=9, S=13):
    """The keywords of ``OPTIONS[name]`` for sdpa (arrays on ``backend``) and for ``naive_attention``."""
    rng = np.random.default_rng(40)
    ours = {}
    for key, value in OPTIONS[name].items():
        if key.endswith("seq_lengths"):
            value = LENGTHS[value]
        elif key == "bias":
            value = rng.standard_normal((3, T, 1, S))
        elif key == "mask":
            value = rng.random((3, T, 4, S)) < 0.85
        ours[key] = value
    ref = {REF_NAMES.get(k, k): v for k, v in ours.items()}
    if backend is not None:
        ours = {k: backend.asarray(v) if isinstance(v, np.ndarray) else v for k, v in ours.items()}
    return ours, ref


def chunkings(backend):
    """Chunkings that cut across the row lengths (4, 7) and windows; on JAX one of them, since eager JAX compiles
    every operation for every new tile shape (all four made its cases a third of the suite's time)."""
    return [(2, 3)] if backend.adapter.name == "jax" else [(None, None), (2, 3), (4, 5), (1, 1)]


@pytest.mark.parametrize("name", OPTIONS)
def test_options_equal_direct_computation(backend, name):
    """Every option at every chunking of ``chunkings``, against ``naive_attention`` in float64."""
    q, k, v = data(41, B=3, T=9, S=13, N=4, K=2)
    ours, ref = options_for(name, backend)
    expected = naive_attention(q, k, v, **ref)
    for chunks in chunkings(backend):
        got = sdpa(*(backend.asarray(a) for a in (q, k, v)), q_chunk_size=chunks[0], kv_chunk_size=chunks[1], **ours)
        assert_matches_reference(got, expected, xp=backend.xp, dtype=backend.xp.float64, tol=1e-12, what=str(chunks))


def test_padded_rows_give_zeros_and_minus_infinity_and_padding_is_never_read():
    q, k, v = data(42, B=3, T=9, S=13, N=4, K=2)
    k[1, 7:], v[1, 7:] = np.nan, np.inf  # padding past row 1's length
    out, lse = sdpa(q, k, v, q_seq_lengths=LENGTHS["q"], kv_seq_lengths=LENGTHS["kv"], return_lse=True, kv_chunk_size=5)
    assert np.isfinite(out).all()
    assert np.all(out[1, 4:] == 0) and np.all(out[2] == 0) and np.all(lse[1, 4:] == -np.inf) and np.all(lse[2] == -np.inf)


@pytest.mark.parametrize("name", ["lengths causal window", "softcap bias mask lengths", "window (2, 1)"])
def test_options_on_every_chunking_of_the_vjp(backend, name):
    """Gradients through lengths, windows and soft-capping, against torch autograd of a direct float64
    computation written in the tests (``test_backward.torch_grads``)."""
    from test_backward import torch_grads

    q, k, v = data(43, B=3, T=9, S=13, N=4, K=2)
    d_out = np.random.default_rng(44).standard_normal((3, 9, 4, 3))
    ours, ref = options_for(name, backend)
    expected = torch_grads(q, k, v, d_out, **ref)
    for chunks in chunkings(backend)[:3]:
        got = mha_cupy.scaled_dot_product_attention_vjp(*(backend.asarray(a) for a in (q, k, v, d_out)),
                                                        q_chunk_size=chunks[0], kv_chunk_size=chunks[1], **ours)
        for g, e, what in zip(got, expected, ("dq", "dk", "dv")):
            assert_matches_reference(g, e, xp=backend.xp, dtype=backend.xp.float64, tol=1e-10, what=f"{what} {chunks}")


def test_options_through_torch_autograd():
    torch = require("torch")
    from test_backward import torch_grads

    q, k, v = data(45, B=3, T=9, S=13, N=4, K=2)
    d_out = np.random.default_rng(46).standard_normal((3, 9, 4, 3))
    ours, ref = options_for("lengths causal window")
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    out = sdpa(tq, tk, tv, softcap=2.0, kv_chunk_size=4, **{k_: torch.tensor(v_) if isinstance(v_, np.ndarray) else v_
                                                            for k_, v_ in ours.items()})
    (out * torch.tensor(d_out)).sum().backward()
    expected = torch_grads(q, k, v, d_out, softcap=2.0, **ref)
    for a, e in zip((tq, tk, tv), expected):
        assert_matches_reference(a.grad, e, xp=array_api_compat.array_namespace(a.grad), dtype=torch.float64, tol=1e-10)


@pytest.mark.parametrize("name", ["lengths causal window", "softcap", "window (2, 1)"])
def test_options_on_dask_with_chunks_across_lengths_and_windows(name):
    da = require("dask.array")
    q, k, v = data(47, B=3, T=9, S=13, N=4, K=2)
    ours, ref = options_for(name)
    ours = {k_: da.from_array(v_) if isinstance(v_, np.ndarray) else v_ for k_, v_ in ours.items()}  # q's library
    got = sdpa(da.from_array(q, chunks=(2, 4, 4, 5)), da.from_array(k, chunks=(2, 5, 2, 5)),
               da.from_array(v, chunks=(2, 5, 2, 3)), **ours)
    np.testing.assert_allclose(got.compute(), naive_attention(q, k, v, **ref), rtol=0, atol=1e-12)


def test_window_skips_key_chunks_and_never_builds_a_full_mask():
    """At L = 4096, window 64, chunks of 128: a query block of 128 sees at most 3 key chunks, not 32; and the
    traced peak stays far below one [B, T, N, S] boolean array."""
    import tracemalloc

    from mha_cupy._core import ChunkLoop

    rng = np.random.default_rng(48)
    q, k, v = (rng.standard_normal((1, 4096, 2, 16), dtype=np.float32) for _ in range(3))
    visited = []
    original = ChunkLoop.key_chunk
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ChunkLoop, "key_chunk", lambda self, bsl, tsl, ssl: (visited.append(ssl), original(self, bsl, tsl, ssl))[1])
        sdpa(q[:, :8], k[:, :8], v[:, :8], local_window_size=2)  # numba's kernels load before tracing
        visited.clear()
        tracemalloc.start()
        try:
            sdpa(q, k, v, local_window_size=64, q_chunk_size=128, kv_chunk_size=128, workers=1)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert len(visited) <= 32 * 3 and all(s.stop - s.start <= 128 for s in visited)
    assert peak < 4096 * 4096 * 2 / 8, f"{peak / 2**20:.1f} MiB traced"


@pytest.mark.parametrize(("kw", "error", "words"), [
    (dict(q_seq_lengths=np.array([9, 10, 0])), ValueError, r"q_seq_lengths must lie in \[0, q_len\] = \[0, 9\], got 10"),
    (dict(kv_seq_lengths=np.array([-1, 2, 3])), ValueError, "kv_seq_lengths must lie in"),
    (dict(kv_seq_lengths=np.array([1, 2])), ValueError, r"kv_seq_lengths must have shape \[batch\] = \[3\]"),
    (dict(kv_seq_lengths=np.array([1.0, 2.0, 3.0])), TypeError, "kv_seq_lengths must have an integer dtype"),
    (dict(kv_seq_lengths=[1, 2, 3]), TypeError, "kv_seq_lengths must be an array, got builtins.list"),
    (dict(local_window_size=-1), ValueError, "local_window_size must be an int >= 0"),
    (dict(local_window_size=(1, -2)), ValueError, r"local_window_size\[1\] \(right\) must be an int >= 0"),
    (dict(local_window_size=(1, 2, 3)), ValueError, "a pair"),
    (dict(local_window_size=1.5), TypeError, "local_window_size must be an int"),
    (dict(softcap=0.0), ValueError, "softcap must be a positive finite float"),
    (dict(softcap=float("nan")), ValueError, "softcap must be a positive finite float"),
    (dict(softcap="1"), TypeError, "softcap must be a positive finite float"),
])
def test_option_refusals(kw, error, words):
    q, k, v = data(49, B=3, T=9, S=13, N=4, K=2)
    before = [a.copy() for a in (q, k, v)]
    with pytest.raises(error, match=words):
        sdpa(q, k, v, **kw)
    with pytest.raises(error, match=words):
        mha_cupy.scaled_dot_product_attention_vjp(q, k, v, q[..., :3], **kw)
    assert all(np.array_equal(a, b) for a, b in zip(before, (q, k, v)))


# -- merge_attention -------------------------------------------------------------------------------------------------


def test_merge_attention_equals_attention_over_the_union(backend):
    q, k, v = data(50, B=2, T=5, S=12, N=4, K=2)
    mask = np.ones((2, 5, 4, 12), bool)
    mask[0, 1] = False  # a row no key is visible to
    parts = [(0, 3), (3, 10), (10, 12)]
    outs, lses = zip(*(sdpa(*(backend.asarray(a[:, :, :, :] if i == 0 else a[:, s0:s1]) for i, a in enumerate((q, k, v))),
                            mask=backend.asarray(mask[..., s0:s1]), return_lse=True) for s0, s1 in parts))
    out, lse = mha_cupy.merge_attention(list(outs), list(lses))
    assert_matches_reference(out, naive_attention(q, k, v, mask=mask), xp=backend.xp, dtype=backend.xp.float64, tol=1e-12)
    assert np.all(to_numpy(lse)[0, 1] == -np.inf) and np.all(to_numpy(out)[0, 1] == 0)


@pytest.mark.parametrize(("outs", "lses", "error", "words"), [
    ([], [], ValueError, "outs must hold at least one array"),
    (np.zeros((2, 3)), [np.zeros(2)], TypeError, "outs must be a non-empty list or tuple"),
    ([np.zeros((2, 3))], [np.zeros(2), np.zeros(2)], ValueError, "one entry per part"),
    ([np.zeros((2, 3)), np.zeros((2, 4))], [np.zeros(2)] * 2, ValueError, r"outs\[1\] must have shape"),
    ([np.zeros((2, 3))], [np.zeros(3)], ValueError, r"lses\[0\] must have shape"),
    ([np.zeros((2, 3))], [None], TypeError, r"lses\[0\] must be an array"),
])
def test_merge_attention_refusals(outs, lses, error, words):
    with pytest.raises(error, match=words):
        mha_cupy.merge_attention(outs, lses)
