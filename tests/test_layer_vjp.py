"""MultiHeadAttention.vjp: against tabpfn 2.2.1's own layer under torch autograd (float64), every weight
layout and call option, the same on every backend, and its refusals."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import require
from mha_cupy import MultiHeadAttention
from mha_cupy.testing import assert_close

TOL = 1e-10
CONFIGS = {
    "w_qkv": dict(emsize=16, nhead=4, d_k=4, d_v=4),
    "w_q_w_kv": dict(emsize=16, nhead=4, d_k=4, d_v=4, share_kv_across_n_heads=2),
    "w_k_w_v": dict(emsize=16, nhead=4, d_k=4, d_v=6),
}
CALLS = [
    ("self", {}),
    ("cross", {}),
    ("cross", dict(add_input=True)),
    ("cross", dict(reuse_first_head_kv=True)),
    ("cross", dict(q_chunk_size=2, kv_chunk_size=3)),
]


def reference_and_ours(config):
    require("tabpfn")
    from mha_cupy._reference import layer_like, reference_layer

    ref = reference_layer(dtype="float64", seed=0, **CONFIGS[config])
    return ref, layer_like(ref, xp="numpy")


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("source, call", CALLS)
def test_against_tabpfn_autograd(config, source, call):
    torch = require("torch")
    ref, ours = reference_and_ours(config)
    rng = np.random.default_rng(0)
    E = CONFIGS[config]["emsize"]
    x = rng.standard_normal((2, 3, 5, E))
    x_kv = rng.standard_normal((2, 3, 9, E)) if source == "cross" else None
    d_out = rng.standard_normal(x.shape)
    tx = torch.tensor(x, requires_grad=True)
    tkv = None if x_kv is None else torch.tensor(x_kv, requires_grad=True)
    ref(tx, tkv, **{k: v for k, v in call.items() if "chunk" not in k}).backward(torch.tensor(d_out))
    dx, dx_kv, grads = ours.vjp(x, d_out, x_kv, **call)
    assert_close(dx, tx.grad.numpy(), rtol=TOL, what="dx")
    if x_kv is None:
        assert dx_kv is None
    else:
        assert_close(dx_kv, tkv.grad.numpy(), rtol=TOL, what="dx_kv")
    have = {n for n in ("w_qkv", "w_q", "w_kv", "w_k", "w_v", "w_out") if getattr(ours, n) is not None}
    assert set(grads) == have
    for name, g in grads.items():
        r = getattr(ref, name).grad
        assert_close(g, np.zeros_like(g) if r is None else r.numpy(), rtol=TOL, what=name)


def test_cached_keys_and_values_are_constants():
    torch = require("torch")
    ref, ours = reference_and_ours("w_q_w_kv")
    rng = np.random.default_rng(1)
    x, x_kv, d_out = rng.standard_normal((2, 5, 16)), rng.standard_normal((2, 9, 16)), rng.standard_normal((2, 5, 16))
    # tabpfn refuses inputs that require grad once it holds a cache, so its reference is the same call with
    # keys/values recomputed from a constant x_kv: the same numbers and gradients for x, w_q and w_out.
    tx = torch.tensor(x, requires_grad=True)
    ref(tx, torch.tensor(x_kv)).backward(torch.tensor(d_out))
    ours(x_kv, cache_kv=True)
    dx, dx_kv, grads = ours.vjp(x, d_out, use_cached_kv=True)
    assert_close(dx, tx.grad.numpy(), rtol=TOL)
    assert dx_kv is None and np.all(grads["w_kv"] == 0)
    assert_close(grads["w_q"], ref.w_q.grad.numpy(), rtol=TOL)
    assert_close(grads["w_out"], ref.w_out.grad.numpy(), rtol=TOL)


def test_dropout_draws_the_forward_calls_mask():
    layer = MultiHeadAttention(emsize=8, nhead=2, d_k=4, d_v=4, dtype="float64", dropout_p=0.3, seed=3)
    twin = MultiHeadAttention(emsize=8, nhead=2, d_k=4, d_v=4, dtype="float64", dropout_p=0.3, seed=3)
    rng = np.random.default_rng(2)
    x, d_out = rng.standard_normal((2, 6, 8)), rng.standard_normal((2, 6, 8))
    dx, _, grads = layer.vjp(x, d_out, training=True)
    eps = 1e-6
    direction = rng.standard_normal(x.shape)

    def f(sign):  # each evaluation is the first training call of a fresh twin: the same mask as the vjp's
        fresh = MultiHeadAttention(emsize=8, nhead=2, d_k=4, d_v=4, dtype="float64", dropout_p=0.3, seed=3)
        return float(np.sum(fresh(x + sign * eps * direction, training=True) * d_out))

    numeric = (f(1) - f(-1)) / (2 * eps)
    assert abs(numeric - float(np.sum(dx * direction))) < 1e-7 * max(1.0, abs(numeric))
    twin(x, training=True)  # the vjp counted as a call: the next masks agree
    assert np.array_equal(layer(x, training=True), twin(x, training=True))


def test_every_backend(backend):
    base = MultiHeadAttention(emsize=12, nhead=3, d_k=4, d_v=4, dtype="float64", seed=0)
    rng = np.random.default_rng(3)
    x, x_kv, d_out = rng.standard_normal((2, 5, 12)), rng.standard_normal((2, 7, 12)), rng.standard_normal((2, 5, 12))
    ref = base.vjp(x, d_out, x_kv)
    moved = base.to(backend.xp, device=backend.device)
    dx, dx_kv, grads = moved.vjp(*(backend.asarray(a) for a in (x, d_out, x_kv)))
    assert_close(dx, backend.asarray(ref[0]), rtol=TOL)
    assert_close(dx_kv, backend.asarray(ref[1]), rtol=TOL)
    for name, g in grads.items():
        assert_close(g, backend.asarray(ref[2][name]), rtol=TOL, what=name)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(cache_kv=True), ValueError, "vjp does not write the cache or x: cache_kv must be False"),
    (dict(allow_inplace=True), ValueError, "allow_inplace must be False"),
    (dict(flying=True), TypeError, r"vjp got an unexpected keyword argument 'flying'"),
    (dict(d_out=np.zeros((2, 5, 11))), ValueError, "d_out must have shape"),
    (dict(d_out=np.zeros((2, 5, 12), np.float32)), TypeError, "d_out"),
])
def test_refusals(kwargs, exc, match):
    layer = MultiHeadAttention(emsize=12, nhead=3, d_k=4, d_v=4, dtype="float64", seed=0)
    x = np.zeros((2, 5, 12))
    d_out = kwargs.pop("d_out", np.zeros((2, 5, 12)))
    with pytest.raises(exc, match=match):
        layer.vjp(x, d_out, **kwargs)


def _tabpfn_grads(ref, x, x_kv, d_out):
    torch = require("torch")
    tx, tkv = torch.tensor(x, requires_grad=True), torch.tensor(x_kv, requires_grad=True)
    ref(tx, tkv, add_input=True).backward(torch.tensor(d_out))
    return tx.grad.numpy(), tkv.grad.numpy(), {n: getattr(ref, n).grad.numpy() for n in ("w_q", "w_kv", "w_out")}


def test_torch_autograd_flows_through_the_layer():
    torch = require("torch")
    ref, ours = reference_and_ours("w_q_w_kv")
    rng = np.random.default_rng(4)
    x, x_kv, d_out = rng.standard_normal((2, 5, 16)), rng.standard_normal((2, 9, 16)), rng.standard_normal((2, 5, 16))
    dx, dx_kv, grads = _tabpfn_grads(ref, x, x_kv, d_out)
    layer = ours.to("torch")
    for name in ("w_q", "w_kv", "w_out"):
        getattr(layer, name).requires_grad_(True)
    tx, tkv = torch.tensor(x, requires_grad=True), torch.tensor(x_kv, requires_grad=True)
    y = layer(tx, tkv, add_input=True)
    y.backward(torch.tensor(d_out))
    assert_close(tx.grad.numpy(), dx, rtol=TOL)
    assert_close(tkv.grad.numpy(), dx_kv, rtol=TOL)
    for name, g in grads.items():
        assert_close(getattr(layer, name).grad.numpy(), g, rtol=TOL, what=name)
    with pytest.raises(ValueError, match="gradients do not flow through calls that write the cache or x"):
        layer(tx, tkv, cache_kv=True)


def test_jax_grad_flows_through_the_layer():
    jax = require("jax")
    jax.config.update("jax_enable_x64", True)
    ref, ours = reference_and_ours("w_q_w_kv")
    rng = np.random.default_rng(5)
    x, x_kv, d_out = rng.standard_normal((2, 5, 16)), rng.standard_normal((2, 9, 16)), rng.standard_normal((2, 5, 16))
    dx, dx_kv, _ = _tabpfn_grads(ref, x, x_kv, d_out)
    layer = ours.to("jax")
    loss = lambda a, b: jax.numpy.sum(layer(a, b, add_input=True) * d_out)  # noqa: E731
    gx, gkv = jax.grad(loss, argnums=(0, 1))(jax.numpy.asarray(x), jax.numpy.asarray(x_kv))
    assert_close(np.asarray(gx), dx, rtol=TOL)
    assert_close(np.asarray(gkv), dx_kv, rtol=TOL)
