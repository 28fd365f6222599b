"""JAX with ``jax_enable_x64`` switched off (its default): float32 and the same dropout bits as
everywhere else through uint32 Philox lanes. The backend-parametrised suite covers JAX with x64 on."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_matches_reference, direct, keep_mask, layer_keep_mask, naive_attention, require
from mha_cupy import MultiHeadAttention, scaled_dot_product_attention
from mha_cupy import dropout as D
from mha_cupy._backends import resolve_backend, to_numpy

jax = require("jax", reason="needs jax (pip install jax)")

pytestmark = pytest.mark.slow


@pytest.fixture
def jnp():
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    try:
        yield resolve_backend("jax").xp
    finally:
        jax.config.update("jax_enable_x64", before)


def test_without_x64_jax_offers_no_float64_and_says_so(jnp):
    be = resolve_backend("jax")
    assert "float64" not in be.float_dtypes() and be.philox_lanes() == jnp.uint32
    with pytest.raises(TypeError, match=r"dtype must be one of the floating dtypes \[.*'float32'.*\] of jax, got 'float64'"):
        MultiHeadAttention(emsize=8, nhead=2, d_k=4, d_v=4, dtype="float64", xp="jax")
    with pytest.raises(TypeError, match="dtype must be one of the floating dtypes"):
        MultiHeadAttention(emsize=8, nhead=2, d_k=4, d_v=4, dtype="float64", seed=0).to("jax")


def test_weights_are_bitwise_numpys(jnp):
    kw = dict(emsize=24, nhead=4, d_k=6, d_v=5, share_kv_across_n_heads=2, seed=8)
    ours, ref = MultiHeadAttention(xp="jax", **kw), MultiHeadAttention(**kw)
    for name in ("w_q", "w_k", "w_v", "w_out"):
        assert getattr(ours, name).dtype == jnp.float32
        np.testing.assert_array_equal(to_numpy(getattr(ours, name)), np.asarray(getattr(ref, name)))


def test_dropout_masks_are_bitwise_the_documented_ones(jnp):
    idx = [jnp.reshape(jnp.arange(n, dtype=jnp.uint32), s)
           for n, s in ((2, (2, 1, 1, 1)), (3, (1, 3, 1, 1)), (5, (1, 1, 5, 1)), (6, (1, 1, 1, 6)))]
    np.testing.assert_array_equal(to_numpy(D.keep_mask(77, 0.4, *idx)), keep_mask(77, 0.4, 2, 3, 5, 6))


def test_attention_with_dropout_and_causal(jnp):
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((2, 5, 4, 3), (2, 7, 2, 3), (2, 7, 2, 2)))
    got = scaled_dot_product_attention(*(jnp.asarray(a) for a in (q, k, v)), dropout_p=0.3, seed=5, is_causal=True,
                                       q_chunk_size=2, kv_chunk_size=3)
    expected = naive_attention(q, k, v, is_causal=True, keep=keep_mask(5, 0.3, 2, 4, 5, 7), dropout_p=0.3)
    assert_matches_reference(got, expected, xp=jnp, dtype=jnp.float32)


def test_layer_caches_streaming_and_training(jnp):
    rng = np.random.default_rng(2)
    layer = MultiHeadAttention(emsize=12, nhead=4, d_k=3, d_v=3, share_kv_across_n_heads=2, dropout_p=0.2,
                               xp="jax", seed=3)
    x = rng.standard_normal((2, 6, 12)).astype(np.float32)
    x_new = rng.standard_normal((2, 3, 12)).astype(np.float32)
    out = layer(jnp.asarray(x), training=True, add_input=True, allow_inplace=True, save_peak_mem_factor=2)
    assert_matches_reference(out, direct(layer, x, add_input=True, keep=layer_keep_mask(layer, 0, 2, 6, 6)), xp=jnp, dtype=jnp.float32)
    for start, stop in ((0, 2), (2, 6)):
        layer(jnp.asarray(x[:, start:stop]), cache_kv=True, append_kv=True)
    assert layer.kv_cache.shape == (2, 6, 2, 2, 3)
    got = layer(jnp.asarray(x_new), use_cached_kv=True)
    assert_matches_reference(got, direct(layer, x_new, x), xp=jnp, dtype=jnp.float32)


def test_one_tile_calls_compile_whole_and_chunked_ones_step_by_step(jnp, monkeypatch):
    import dataclasses

    from mha_cupy._plan import AttentionPlan, ChunkPlan
    from mha_cupy._route import compiles_whole

    be, compiled = resolve_backend("jax"), []
    real = be.compile
    monkeypatch.setattr(type(be), "compile", lambda self, fn, static_argnames=(): compiled.append(fn.__name__)
                        or real(fn, static_argnames))
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((2, 12, 4, 8), dtype=np.float32) for _ in range(3))
    expected = naive_attention(q, k, v, is_causal=True)
    for chunks, whole in (((None, None), True), ((4, 5), False)):
        compiled.clear()
        got = scaled_dot_product_attention(*(jnp.asarray(a) for a in (q, k, v)), is_causal=True,
                                           q_chunk_size=chunks[0], kv_chunk_size=chunks[1])
        assert_matches_reference(got, expected, xp=jnp, dtype=jnp.float32, tol=1e-5)
        assert ("attend" in compiled) is whole, compiled
    plan = AttentionPlan(scale=1.0, chunks=ChunkPlan(batch=2, q=12, kv=12), workers=1)
    assert compiles_whole(plan, (2, 12, 12)) and not compiles_whole(plan, (2, 12, 13))
    for changing in ({"dropout_key": (1, 2)}, {"q_lengths": (3, 4)}, {"kv_lengths": (3, 4)}):  # would recompile each call
        assert not compiles_whole(dataclasses.replace(plan, **changing), (2, 12, 12))


def test_parts_of_a_split_call_share_one_compiled_program(jnp, monkeypatch):
    import mha_cupy._route as route

    traced = []

    def counting_attend(*args, **kwargs):
        traced.append(kwargs["offsets"])
        return real(*args, **kwargs)

    real = route.attend
    monkeypatch.setattr(route, "attend", counting_attend)
    layer = MultiHeadAttention(emsize=16, nhead=4, d_k=4, d_v=4, xp="jax", seed=1)
    x = np.random.default_rng(2).standard_normal((8, 12, 16), dtype=np.float32)
    got = layer(jnp.asarray(x), save_peak_mem_factor=4, allow_inplace=True)
    assert_matches_reference(got, direct(layer, x), xp=jnp, dtype=jnp.float32, tol=1e-5)
    assert traced == [(0, 0, 0)], traced  # four parts of two batch rows: traced once, not once per batch offset


def test_under_jit_lengths_must_be_known_and_quantized_calls_say_why_not(jnp):
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((2, 6, 2, 8), dtype=np.float32) for _ in range(3))
    lengths = np.array([3, 6])
    with pytest.raises(TypeError, match="kv_seq_lengths must have values known when the call is planned .* inside "
                       "jax.jit; close over the lengths"):
        jax.jit(lambda q, n: scaled_dot_product_attention(q, q, q, kv_seq_lengths=n))(jnp.asarray(q), jnp.asarray(lengths))
    known = jnp.asarray(lengths)  # closed over: a constant of the traced function
    got = jax.jit(lambda q, k, v: scaled_dot_product_attention(q, k, v, kv_seq_lengths=known))(
        *(jnp.asarray(a) for a in (q, k, v)))
    assert_matches_reference(got, naive_attention(q, k, v, kv_lengths=lengths), xp=jnp, dtype=jnp.float32, tol=1e-5)
    k8 = jnp.asarray(np.ones((2, 6, 2, 8), dtype=np.int8))
    with pytest.raises(TypeError, match="take no gradients; .*outside jax.grad and jax.jit"):
        jax.jit(lambda q, s: scaled_dot_product_attention(q, k8, k8, k_scale=s, v_scale=s))(
            jnp.asarray(q), jnp.asarray([0.5, 0.5], dtype=jnp.float32))


def _dot_precisions(fn, *args) -> list[str]:
    text = jax.jit(fn).lower(*args).as_text()
    return [line.split("precision = ")[1].split("]")[0] + "]" for line in text.splitlines() if "dot_general" in line]


def test_every_product_asks_for_full_float32(jnp):
    """On GPUs JAX's default precision multiplies float32 in TF32, 3e-4 off the reference (an H200 campaign run):
    every product of the forward, the vjp and the layer asks for HIGHEST (a no-op on CPUs, so checked in the
    program JAX compiles)."""
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 6, 4, 8)), dtype=jnp.float32) for _ in range(3))
    layer = MultiHeadAttention(emsize=16, nhead=4, d_k=4, d_v=4, xp="jax", seed=0)
    x = jnp.asarray(rng.standard_normal((2, 5, 16)), dtype=jnp.float32)
    programs = {
        "forward": (lambda q, k, v: scaled_dot_product_attention(q, k, v, kv_chunk_size=2), q, k, v),
        "grad": (jax.grad(lambda q, k, v: jnp.sum(scaled_dot_product_attention(q, k, v)), argnums=(0, 1, 2)), q, k, v),
        "layer": (lambda x: layer(x), x),
    }
    for name, (fn, *args) in programs.items():
        found = _dot_precisions(fn, *args)
        assert found and set(found) == {"[HIGHEST, HIGHEST]"}, (name, found)


@pytest.mark.parametrize("given", ["mask", "bias"])
def test_grad_of_jit_with_the_mask_or_bias_an_argument(given):
    """``jax.grad(jax.jit(f))`` where the mask or bias is an argument of ``f`` (a tracer inside the node). q and k
    all ones: every visible key weighs the same, so dv = (queries / visible keys) on visible keys, 0 elsewhere."""
    jn = jax.numpy
    q, k, v = jn.ones((1, 2, 1, 2)), jn.ones((1, 3, 1, 2)), jn.arange(6.0).reshape(1, 3, 1, 2)
    extra = jn.array([True, True, False]).reshape(1, 1, 1, 3) if given == "mask" else jn.zeros((1, 2, 1, 3))
    expected = np.array([1.0, 1, 1, 1, 0, 0]) if given == "mask" else np.full(6, 2 / 3)

    def f(q, k, v, extra):
        return jn.sum(scaled_dot_product_attention(q, k, v, **{given: extra}))

    for grad in (jax.grad(jax.jit(f), argnums=2), jax.jit(jax.grad(f, argnums=2))):
        np.testing.assert_allclose(np.asarray(grad(q, k, v, extra)).ravel(), expected, rtol=1e-6)
