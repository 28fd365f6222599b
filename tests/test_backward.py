"""scaled_dot_product_attention_vjp: against torch autograd (float64), finite differences with dropout,
and the same gradients on every backend and at every chunking."""

from __future__ import annotations

import numpy as np
import pytest

import mha_cupy
from helpers import keep_mask, require, visible
from mha_cupy._backends import to_numpy
from mha_cupy.testing import assert_close

TOL = 1e-10


def problem(B=2, T=7, S=11, N=4, K=2, H=5, V=3, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, T, N, H)), rng.standard_normal((B, S, K, H)), rng.standard_normal((B, S, K, V)),
            rng.standard_normal((B, T, N, V)))


def torch_grads(q, k, v, d_out, *, scale=None, mask=None, bias=None, is_causal=False, keep=None, dropout_p=0.0,
                q_lengths=None, kv_lengths=None, window=None, softcap=None):
    """Autograd of a direct float64 attention written in torch (repeated kv heads, explicit masks)."""
    torch = require("torch")
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    B, T, N, H = q.shape
    S, G = k.shape[1], N // k.shape[2]
    kr, vr = (a.repeat_interleave(G, dim=2) for a in (tk, tv))
    logits = torch.einsum("btnh,bsnh->bnts", tq, kr) * (H**-0.5 if scale is None else scale)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if bias is not None:
        logits = logits + torch.tensor(bias).permute(0, 2, 1, 3)
    allowed = torch.ones((B, N, T, S), dtype=torch.bool)
    if mask is not None:
        allowed = allowed & torch.tensor(np.broadcast_to(mask, (B, T, N, S))).permute(0, 2, 1, 3)
    allowed = allowed & torch.tensor(visible(B, T, S, is_causal=is_causal, q_lengths=q_lengths, kv_lengths=kv_lengths,
                                             window=window))[:, None]
    p = torch.softmax(logits.masked_fill(~allowed, -torch.inf), dim=-1).nan_to_num(0.0)
    if keep is not None:
        p = p * torch.tensor(keep) / (1 - dropout_p)
    out = torch.einsum("bnts,bsnv->btnv", p, vr)
    out.backward(torch.tensor(d_out))
    return tuple(a.grad.numpy() for a in (tq, tk, tv))


@pytest.mark.parametrize("kw", [
    dict(),
    dict(is_causal=True),
    dict(is_causal=True, shape=dict(T=13, S=6)),   # queries beyond the keys: some rows see nothing
    dict(scale=0.3, q_chunk_size=3, kv_chunk_size=4),
    dict(bias=True, mask=True),
    dict(shape=dict(N=6, K=1, S=40), kv_chunk_size=16),
])
def test_against_torch_autograd(kw):
    kw = dict(kw)
    q, k, v, d_out = problem(**kw.pop("shape", {}))
    B, T, N, _ = q.shape
    S = k.shape[1]
    rng = np.random.default_rng(5)
    if kw.pop("mask", False):
        kw["mask"] = rng.random((B, T, 1, S)) > 0.3
        kw["mask"][0, 2] = False  # one row sees nothing
    if kw.pop("bias", False):
        kw["bias"] = rng.standard_normal((1, T, N, S))
    ref = torch_grads(q, k, v, d_out, **{n: kw[n] for n in ("scale", "mask", "bias", "is_causal") if n in kw})
    ours = mha_cupy.scaled_dot_product_attention_vjp(q, k, v, d_out, **kw)
    for name, g, r in zip(("dq", "dk", "dv"), ours, ref):
        assert_close(g, r, rtol=TOL, what=name)


def test_dropout_uses_the_forward_mask():
    q, k, v, d_out = problem()
    keep = keep_mask(9, 0.25, 2, 4, 7, 11)
    ref = torch_grads(q, k, v, d_out, keep=keep, dropout_p=0.25)
    ours = mha_cupy.scaled_dot_product_attention_vjp(q, k, v, d_out, dropout_p=0.25, seed=9, kv_chunk_size=4)
    for g, r in zip(ours, ref):
        assert_close(g, r, rtol=TOL)


def test_finite_differences_with_dropout():
    q, k, v, d_out = problem(B=1, T=4, S=6, N=2, K=1, H=3, V=2)
    kw = dict(dropout_p=0.3, seed=4, is_causal=True)
    grads = mha_cupy.scaled_dot_product_attention_vjp(q, k, v, d_out, **kw)
    rng = np.random.default_rng(1)
    eps = 1e-6
    for i, g in enumerate(grads):
        direction = rng.standard_normal(g.shape)

        def f(sign):
            args = [q, k, v]
            args[i] = args[i] + sign * eps * direction
            return float(np.sum(mha_cupy.scaled_dot_product_attention(*args, **kw) * d_out))

        numeric = (f(1) - f(-1)) / (2 * eps)
        assert abs(numeric - float(np.sum(g * direction))) < 1e-7 * max(1.0, abs(numeric))


def test_chunkings_and_fully_masked_rows():
    q, k, v, d_out = problem(T=9, S=5)
    whole = mha_cupy.scaled_dot_product_attention_vjp(q, k, v, d_out, is_causal=True)
    tiny = mha_cupy.scaled_dot_product_attention_vjp(q, k, v, d_out, is_causal=True, q_chunk_size=1, kv_chunk_size=1)
    for a, b in zip(whole, tiny):
        assert_close(a, b, rtol=1e-12)
    assert np.all(whole[0][:, :4] == 0)  # rows 0-3 see no key (bottom-right causal, T > S)


@pytest.mark.parametrize("junk", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("hidden", ["q_seq_lengths", "mask"])
def test_nan_in_hidden_query_rows_leaves_key_gradients_finite(backend, hidden, junk):
    """A query row that sees no key (padding past ``q_seq_lengths``, or masked out) weighs 0 in dK and dV: a NaN or
    an infinity there must not reach them (jax-ml/jax#26328, pytorch/pytorch#41508). Independent expectation: the
    real row alone, one key, so its weight is 1 and its gradients are closed-form (dq = 0, dk = 0, dv = d_out)."""
    dt = "float32"
    q = backend.asarray(np.array([0.5, junk]).reshape(1, 2, 1, 1), dtype=dt)
    k, v = (backend.asarray(np.full((1, 1, 1, 1), x), dtype=dt) for x in (1.0, 2.0))
    d_out = backend.asarray(np.array([1.0, junk]).reshape(1, 2, 1, 1), dtype=dt)
    kw = ({"q_seq_lengths": backend.asarray(np.array([1], dtype=np.int32))} if hidden == "q_seq_lengths" else
          {"mask": backend.asarray(np.array([True, False]).reshape(1, 2, 1, 1))})
    dq, dk, dv = (to_numpy(g).astype(np.float64)
                  for g in mha_cupy.scaled_dot_product_attention_vjp(q, k, v, d_out, **kw))
    np.testing.assert_array_equal(dq.ravel(), [0.0, 0.0])
    np.testing.assert_array_equal(dk.ravel(), [0.0])
    np.testing.assert_array_equal(dv.ravel(), [1.0])


def test_every_backend(backend):
    q, k, v, d_out = problem()
    ref = torch_grads(q, k, v, d_out, is_causal=True)
    args = [backend.asarray(a) for a in (q, k, v, d_out)]
    ours = mha_cupy.scaled_dot_product_attention_vjp(*args, is_causal=True, kv_chunk_size=4)
    for g, r in zip(ours, ref):
        assert_close(g, backend.asarray(r), rtol=TOL)


@pytest.mark.parametrize("change, exc, match", [
    (dict(dropout_p=0.1), ValueError, "seed is required with dropout_p > 0"),
    (dict(d_out=np.zeros((2, 7, 4, 2))), ValueError, r"d_out must have shape \[2, 7, 4, 3\]"),
    (dict(d_out=np.zeros((2, 7, 4, 3), np.float32)), TypeError, "d_out"),
    (dict(d_out=None), TypeError, "d_out must be an array, got None"),
])
def test_bad_calls(change, exc, match):
    q, k, v, d_out = problem()
    d_out = change.pop("d_out", d_out)
    with pytest.raises(exc, match=match):
        mha_cupy.scaled_dot_product_attention_vjp(q, k, v, d_out, **change)


@pytest.mark.parametrize("kw", [dict(is_causal=True), dict(dropout_p=0.25, seed=9, kv_chunk_size=4)])
def test_torch_autograd_flows_through_the_function(kw):
    torch = require("torch")
    q, k, v, d_out = problem()
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    out = mha_cupy.scaled_dot_product_attention(tq, tk, tv, **kw)
    assert out.grad_fn is not None
    out.backward(torch.tensor(d_out))
    keep = keep_mask(9, 0.25, 2, 4, 7, 11) if "seed" in kw else None
    ref = torch_grads(q, k, v, d_out, is_causal=kw.get("is_causal", False), keep=keep, dropout_p=kw.get("dropout_p", 0))
    for t, r in zip((tq, tk, tv), ref):
        assert_close(t.grad.numpy(), r, rtol=TOL)


def test_torch_without_grad_and_lse_outputs():
    torch = require("torch")
    q, k, v, _ = problem()
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    with torch.no_grad():
        assert mha_cupy.scaled_dot_product_attention(tq, tk, tv).grad_fn is None
    out, lse = mha_cupy.scaled_dot_product_attention(tq, tk, tv, return_lse=True)
    assert out.requires_grad and not lse.requires_grad
    assert_close(out.detach().numpy(), mha_cupy.scaled_dot_product_attention(q, k, v), rtol=1e-12)


def test_jax_grad_flows_through_the_function():
    jax = require("jax")
    jax.config.update("jax_enable_x64", True)
    q, k, v, d_out = problem()
    ref = torch_grads(q, k, v, d_out, is_causal=True)

    def loss(q, k, v):
        return jax.numpy.sum(mha_cupy.scaled_dot_product_attention(q, k, v, is_causal=True, kv_chunk_size=4) * d_out)

    grads = jax.grad(loss, argnums=(0, 1, 2))(*(jax.numpy.asarray(a) for a in (q, k, v)))
    for g, r in zip(grads, ref):
        assert_close(np.asarray(g), r, rtol=TOL)


@pytest.mark.parametrize("kw", [dict(), dict(is_causal=True), dict(scale=0.4, bias=True), dict(mask=True)])
def test_against_torch_sdpa_autograd(kw):
    torch = require("torch")
    from torch.nn.attention.bias import causal_lower_right

    q, k, v, d_out = problem(T=9, S=12)
    B, T, N, _ = q.shape
    S = k.shape[1]
    rng = np.random.default_rng(8)
    kw = dict(kw)
    attn = {}
    if kw.pop("bias", False):
        kw["bias"] = rng.standard_normal((B, T, N, S))
        attn["attn_mask"] = torch.tensor(kw["bias"]).permute(0, 2, 1, 3)
    if kw.pop("mask", False):
        kw["mask"] = rng.random((B, T, N, S)) > 0.3
        kw["mask"][..., 0] = True  # every row sees a key (torch gives NaN otherwise)
        attn["attn_mask"] = torch.tensor(kw["mask"]).permute(0, 2, 1, 3)
    if kw.get("is_causal"):
        attn["attn_mask"] = causal_lower_right(T, S)
    tq, tk, tv = (torch.tensor(a).transpose(1, 2).requires_grad_(True) for a in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True, scale=kw.get("scale"), **attn)
    out.backward(torch.tensor(d_out).transpose(1, 2))
    ours = mha_cupy.scaled_dot_product_attention_vjp(q, k, v, d_out, kv_chunk_size=5, **kw)
    for g, t in zip(ours, (tq, tk, tv)):
        assert_close(g, t.grad.transpose(1, 2).numpy(), rtol=TOL)
