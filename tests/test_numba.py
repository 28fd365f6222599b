"""The compiled CPU kernels (``mha_cupy/_backends/_numba.py``) and the fixed-order product they share bits with.

Checked against float64 computations written here, and the fixed-order product bitwise against the
element-wise version every library runs (``_backends._base.fixed_order_matmul``).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

from types import SimpleNamespace

import numpy as np
import pytest

from helpers import require
from mha_cupy._backends import _numba, resolve_backend
from mha_cupy._backends._base import Backend, fixed_order_matmul


@pytest.fixture(scope="module")
def kernels():
    require("numba")
    found = _numba.load()
    if found is None:
        pytest.skip("MHA_CUPY_NUMBA=0 is set: the compiled kernels are off")
    return found


def softmax_reference(scores, m, l, acc):
    """``softmax_chunk``'s update in float64, from the same float32 inputs."""
    s64, m64 = scores.astype(np.float64), m.astype(np.float64)
    m_new = np.maximum(m64, s64.max(axis=1))
    shift = np.where(np.isneginf(m_new), 0.0, m_new)
    p = np.exp(s64 - shift[:, None])
    alpha = np.exp(m64 - shift)
    return p, m_new, l * alpha + p.sum(axis=1), acc * alpha[:, None]


def test_softmax_chunk_matches_float64(kernels):
    rng = np.random.default_rng(0)
    R, S, V = 70, 515, 9
    scores = (rng.standard_normal((R, S)) * 6).astype(np.float32)
    scores[::7, ::3] = -np.inf  # masked keys
    scores[4:6] = -np.inf  # rows with nothing visible in this chunk (row 4: nor before)
    m = rng.standard_normal(R).astype(np.float32) * 3
    m[::4] = -np.inf  # rows with nothing visible before
    l = np.where(np.isneginf(m), 0, rng.random(R) + 0.5).astype(np.float32)
    acc = rng.standard_normal((R, V)).astype(np.float32)
    p_ref, m_ref, l_ref, acc_ref = softmax_reference(scores, m, l, acc)
    kernels.softmax_chunk(scores, m, l, acc)
    assert np.array_equal(m, m_ref.astype(np.float32))  # the max is exact
    np.testing.assert_allclose(scores, p_ref, rtol=0, atol=1e-7)
    # The rescaling exp(m - m') is float32 of an argument up to ~40: relative error ~ 40 eps.
    np.testing.assert_allclose(l, l_ref, rtol=1e-5, atol=0)
    np.testing.assert_allclose(acc, acc_ref, rtol=1e-5, atol=1e-30)
    assert np.all(scores[4:6] == 0) and np.isneginf(m[4]) and l[4] == 0  # nothing visible: no weight, max -inf
    assert np.all(scores[::7, ::3] == 0)  # exp(-inf) is exactly 0


def test_exp_within_two_ulp_and_exact_at_the_ends(kernels):
    """A sweep of a million float32 arguments over the range the softmax produces, [-87.3, 0]."""
    x = -np.linspace(0, 87.33, 1_000_003, dtype=np.float32)
    row = x.copy()[None, :]
    kernels.softmax_chunk(row, np.zeros(1, np.float32), np.zeros(1, np.float32), np.zeros((1, 1), np.float32))
    exact = np.exp(x.astype(np.float64))
    ulps = np.abs(row[0] - exact) / np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert ulps.max() <= 2.0, ulps.max()
    ends = np.array([[0.0, -0.0, -87.5, -100.0, -1e30, -np.inf], [0.0, -1.0, np.nan, -np.inf, -3.0, -2.0]], np.float32)
    l = np.zeros(2, np.float32)
    kernels.softmax_chunk(ends, np.zeros(2, np.float32), l, np.zeros((2, 1), np.float32))
    assert ends[0].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0] and l[0] == 2.0
    assert math.isnan(l[1]) and math.isnan(ends[1, 2])  # a NaN score poisons its row, as in NumPy


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 7, 33, 19), (1, 32, 512, 8), (2, 5, 0, 4), (1, 1, 192, 576)], ids=str)
def test_fixed_order_matmul_same_bits_compiled_and_element_wise(kernels, dtype, shape):
    P, M, D, F = shape
    rng = np.random.default_rng(P * M + D)
    a, b = rng.standard_normal((P, M, D)).astype(dtype), rng.standard_normal((P, D, F)).astype(dtype)
    out = np.empty((P, M, F), dtype)
    kernels.matmul_fixed(a, b, out)
    np.testing.assert_array_equal(out, fixed_order_matmul(a, b, xp=resolve_backend("numpy").xp))
    exact = a.astype(np.float64) @ b.astype(np.float64)
    tol = 1e-5 if dtype == np.float32 else 1e-10
    assert np.abs(out - exact).max(initial=0) <= tol * max(1.0, np.abs(exact).max(initial=0))


def test_fixed_order_rows_do_not_depend_on_the_other_rows():
    """The definition itself: a row's bits are those of the row alone, at any position, with any row count."""
    be = resolve_backend("numpy")
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((40, 64)).astype(np.float32), rng.standard_normal((64, 24)).astype(np.float32)
    whole = be.matmul(a, b, fixed_order=True)
    for rows in (np.s_[6:7], np.s_[3:17], np.s_[39:40]):
        np.testing.assert_array_equal(be.matmul(a[rows], b, fixed_order=True), whole[rows])


def test_fixed_order_matmul_is_the_same_on_torch():
    """Element-wise IEEE steps in one order: torch's generic fixed-order product has NumPy's bits."""
    torch = require("torch")
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((2, 9, 40)).astype(np.float32), rng.standard_normal((2, 40, 11)).astype(np.float32)
    ours = resolve_backend("numpy").matmul(a, b, fixed_order=True)
    theirs = Backend.matmul(resolve_backend("torch"), torch.from_numpy(a), torch.from_numpy(b), fixed_order=True)
    np.testing.assert_array_equal(theirs.numpy(), ours)


def test_numpy_adapter_uses_the_kernel_and_falls_back(kernels, monkeypatch):
    """Same update through the adapter with the kernel, and through the Array API steps without it."""
    be = resolve_backend("numpy")
    consts = tuple(np.asarray(c, np.float32) for c in (-np.inf, 0.0, 1.0))
    rng = np.random.default_rng(5)

    def state():
        scores = (rng.standard_normal((1, 2, 3, 2, 40)) * 4).astype(np.float32)
        m = np.full((1, 2, 3, 2, 1), -np.inf, np.float32)
        return scores, m, np.zeros_like(m), np.ones((1, 2, 6, 5), np.float32)

    args = state()
    calls = []
    spy = SimpleNamespace(softmax_chunk=lambda *a: (calls.append(a), kernels.softmax_chunk(*a)))
    monkeypatch.setattr(_numba, "load", lambda: spy)
    compiled = be.online_softmax(*(a.copy() for a in args), consts)
    assert len(calls) == 1  # the kernel ran
    monkeypatch.setattr(_numba, "load", lambda: None)
    fallback = be.online_softmax(*(a.copy() for a in args), consts)
    for got, want in zip(compiled, fallback):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_switch_off_by_environment():
    code = "from mha_cupy._backends import _numba; print(_numba.load() is None)"
    env_out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, _numba.ENV_SWITCH: "0"}).stdout.strip()
    assert env_out == "True"


@pytest.mark.parametrize("sizes", [(2, 9, 5, 3, 7), (6, 4, 32, 512, 32), (1, 7, 37, 1, 24), (3, 1, 8, 70, 64)],
                         ids=lambda s: "P={} R={} H={} s={} V={}".format(*s))
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("pad", [0, 9], ids=["whole chunk", "short chunk"])
def test_fused_chunk_is_the_step_by_step_chunk_element_for_element(kernels, sizes, masked, pad):
    """``attend_chunk`` = the fixed-order scores, the hidden keys at -inf, ``softmax_chunk`` (over the grid's width
    when the chunk is shorter) and ``acc += p @ v``, bit for bit, whatever the number of rows (blocks of four and the rest one by one) and the sizes' remainders;
    over two chunks, so the running max, sum and rescaled accumulator carry over."""
    P, R, H, s, V = sizes
    groups, kv_heads = (R, 1) if R > 1 else (1, 1)
    rng = np.random.default_rng(sum(sizes))
    q = (rng.standard_normal((P, R, H)) / math.sqrt(H)).astype(np.float32)
    chunks = [(rng.standard_normal((P, H, s)).astype(np.float32), rng.standard_normal((P, s, V)).astype(np.float32),
               rng.random((P, 1, 1, groups, s)) > 0.3) for _ in range(2)]
    fused = [np.full((P, R), -np.inf, np.float32), np.zeros((P, R), np.float32), np.zeros((P, R, V), np.float32)]
    steps = [a.copy() for a in fused]
    for kt, v, allowed in chunks:
        mask = allowed if masked else np.ones((1, 1, 1, 1, 1), bool)
        kernels.attend_chunk(q, kt, v, *fused, mask, masked, kv_heads, groups, np.empty((4, s + pad), np.float32),
                             np.empty((4, V), np.float32))
        scores = np.empty((P, R, s), np.float32)
        kernels.matmul_fixed(q, kt, scores)
        if masked:
            scores = np.where(allowed.reshape(P, R, s), scores, np.float32(-np.inf))
        scores = np.concatenate([scores, np.full((P, R, pad), -np.inf, np.float32)], axis=2)  # the grid's width
        m, l, acc = steps
        kernels.softmax_chunk(scores.reshape(P * R, s + pad), m.reshape(-1), l.reshape(-1), acc.reshape(P * R, V))
        pv = np.empty((P, R, V), np.float32)
        kernels.matmul_fixed(np.ascontiguousarray(scores[..., :s]), v, pv)
        acc += pv
    for got, want in zip(fused, steps):
        np.testing.assert_array_equal(got, want)
