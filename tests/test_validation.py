"""The bad-input battery: every refusal names the argument, the expectation and what came."""

from __future__ import annotations

import numpy as np
import pytest

import mha_cupy
from helpers import naive_attention, require
from mha_cupy import MultiHeadAttention, broadcast_kv_across_heads
from mha_cupy import convert_torch_nn_multihead_attention_state_dict as convert_sd
from mha_cupy import scaled_dot_product_attention as sdpa
from mha_cupy._backends import resolve_backend
from mha_cupy._validation import check_probability, check_shape_and_dtype, shape_str


def layer(**kw):
    base = dict(emsize=8, nhead=4, d_k=2, d_v=2, dtype="float64", seed=0)
    return MultiHeadAttention(**{**base, **kw})


X = np.random.default_rng(0).standard_normal((2, 3, 8))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(emsize=0), ValueError, "emsize must be an int >= 1, got 0"),
        (dict(nhead=2.0), TypeError, "nhead must be an int >= 1, got float 2.0"),
        (dict(share_kv_across_n_heads=3), ValueError, "nhead must be divisible by share_kv_across_n_heads: nhead 4, got share_kv_across_n_heads 3"),
        (dict(dropout_p=-0.1), ValueError, r"dropout_p must be a float in \[0, 1\], got -0.1"),
        (dict(dtype="int8"), TypeError, "dtype must be one of the floating dtypes"),
        (dict(softmax_scale="x"), TypeError, "scale must be a finite float"),
        (dict(initialize_output_to_zero=1), TypeError, "initialize_output_to_zero must be a bool"),
        (dict(init_gain="1"), TypeError, "init_gain must be a finite float, got str"),
        (dict(seed=2**64), ValueError, "seed must be an int in"),
        (dict(xp="tensorflow"), ValueError, "xp must be a namespace module or one of"),
        (dict(precomputed_k=np.zeros((1, 2, 4, 2))), ValueError, "precomputed_k and precomputed_v come together"),
        (dict(precomputed_kv=np.zeros((1, 2, 2, 3, 2))), ValueError, r"precomputed_kv must have shape \[\*, \*, 2, 4, 2\]"),
        (dict(precomputed_kv=np.zeros((1, 2, 2, 4, 2), dtype=np.float32)), TypeError, "precomputed_kv must have dtype float64, got float32"),
    ],
)
def test_constructor(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        layer(**kwargs)


def test_set_parameters():
    m = layer()
    w_qkv, w_out = np.asarray(m.w_qkv), np.asarray(m.w_out)
    with pytest.raises(ValueError, match=r"w_qkv must have shape \[3, 4, 2, 8\], got shape \[3, 4, 2, 7\]"):
        m.set_parameters(w_out, w_qkv=w_qkv[..., :7])
    with pytest.raises(ValueError, match=r"w_out must have 3 dimensions"):
        m.set_parameters(w_out[None], w_qkv=w_qkv)
    with pytest.raises(TypeError, match="w_qkv must have dtype float64, got float32"):
        m.set_parameters(w_out, w_qkv=w_qkv.astype(np.float32))
    with pytest.raises(ValueError, match="exactly one of w_qkv and w_q"):
        m.set_parameters(w_out, w_q=w_qkv[:1], w_qkv=w_qkv)
    with pytest.raises(ValueError, match="exactly one of the two"):
        m.set_parameters(w_out, w_qkv=w_qkv, precomputed_kv=np.zeros((1, 2, 2, 4, 2)))
    with pytest.raises(ValueError, match="w_k and w_v come together"):
        m.set_parameters(w_out, w_q=w_qkv[:1], w_k=w_qkv[1])
    with pytest.raises(ValueError, match="w_out is required"):
        m.set_parameters(None, w_qkv=w_qkv)
    with pytest.raises(TypeError, match="w_qkv must be an array"):
        m.set_parameters(w_out, w_qkv=w_qkv.tolist())
    g = layer(share_kv_across_n_heads=2)
    with pytest.raises(ValueError, match="w_qkv needs as many kv heads as heads"):
        g.set_parameters(w_out, w_qkv=w_qkv)
    d = layer(d_v=3)
    with pytest.raises(ValueError, match="w_qkv/w_kv need d_k == d_v"):
        d.set_parameters(np.asarray(d.w_out), w_q=np.asarray(d.w_q), w_kv=np.zeros((2, 4, 2, 8)))


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((X[0, 0],), {}, ValueError, r"x must have shape \[..., seq_len, emsize=8\], got shape \[8\]"),
        ((X[..., :7],), {}, ValueError, r"x must have shape \[2, 3, 8\] \[..., seq_len, emsize\], got shape \[2, 3, 7\]"),
        ((X.astype(np.float32),), {}, TypeError, "x must have dtype float64, got float32"),
        ((X, X[:1]), {}, ValueError, r"x_kv must have shape \[2, \*, 8\]"),
        ((X, X[..., :6]), {}, ValueError, r"x_kv must have shape \[2, \*, 8\]"),
        ((X.tolist(),), {}, TypeError, "x must be an array"),
        ((X,), dict(use_cached_kv=True), ValueError, "use_cached_kv=True but the cache is empty"),
        ((X,), dict(cache_kv=True, use_cached_kv=True), ValueError, "cache_kv and use_cached_kv cannot both be True"),
        ((X,), dict(append_kv=True), ValueError, "append_kv=True needs cache_kv=True"),
        ((X,), dict(save_peak_mem_factor=2), ValueError, "needs allow_inplace=True"),
        ((X,), dict(save_peak_mem_factor=1, allow_inplace=True), ValueError, "save_peak_mem_factor must be an int >= 2, got 1"),
        ((X,), dict(save_peak_mem_factor=2.0, allow_inplace=True), TypeError, "save_peak_mem_factor must be an int"),
        ((X,), dict(training="yes"), TypeError, "training must be a bool"),
        ((X,), dict(q_chunk_size=0), ValueError, "q_chunk_size must be an int >= 1, got 0"),
        ((X,), dict(memory_budget="1B"), ValueError, "memory_budget of 1 bytes is too small"),
        ((X,), dict(reuse_first_head_kv=True), ValueError, "reuse_first_head_kv=True is for cross-attention"),
    ],
)
def test_call(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        layer()(*args, **kwargs)


def test_call_with_cache_mismatch():
    m = layer()
    m(X, cache_kv=True)
    with pytest.raises(ValueError, match="x_kv must be None"):
        m(X, X.copy(), use_cached_kv=True)
    with pytest.raises(ValueError, match="x has 1 flattened batch rows but the cache holds 2"):
        m(X[:1], use_cached_kv=True)
    with pytest.raises(ValueError, match="append_kv=True must match the cached layout"):
        m(X, cache_kv=True, append_kv=True, only_cache_first_head_kv=True)


def test_precomputed_layer_needs_use_cached_kv():
    m = layer(precomputed_kv=np.zeros((2, 4, 2, 4, 2)))
    with pytest.raises(ValueError, match="no key/value weights"):
        m(X)
    assert m(X, use_cached_kv=True).shape == X.shape


def test_no_silent_promotion_and_inputs_untouched():
    m = layer(dtype="float32")
    x = X.astype(np.float32)
    before = x.copy()
    out = m(x, add_input=True)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(x, before)
    m(x, x[:, ::-1].copy(), reuse_first_head_kv=True, cache_kv=True, q_chunk_size=1)
    np.testing.assert_array_equal(x, before)


def test_allow_inplace_with_save_peak_mem_factor_writes_into_x():
    m = layer()
    x = X.copy()
    expected = m(X, add_input=True)
    out = m(x, add_input=True, allow_inplace=True, save_peak_mem_factor=2)
    np.testing.assert_allclose(x, expected, rtol=0, atol=1e-12)
    assert np.shares_memory(out, x)


def test_helpers():
    assert shape_str((2, None, 3)) == "[2, *, 3]"
    with pytest.raises(ValueError, match=r"a must have 2 dimensions \[r, c\], shape \[2, \*\], got shape \[2\]"):
        check_shape_and_dtype(np.zeros(2), "a", (2, None), legend="[r, c]", be=resolve_backend("numpy"))
    with pytest.raises(TypeError, match="p must be a float"):
        check_probability("0.5", "p")


# -- the bad calls the reliability issue listed, each refused with a message naming the argument -------

Q = np.ones((1, 4, 2, 3))


def _torch_layer(**kw):
    require("torch")
    return layer(xp="torch", **kw)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: layer(d_v=3, precomputed_kv=np.zeros((2, 3, 2, 4, 2))), ValueError, "precomputed_kv .* needs d_k == d_v, got d_k 2 and d_v 3"),
        (lambda: sdpa(Q, Q, Q, memory_budget=1, q_chunk_size=1), ValueError, "memory_budget of 1 bytes is too small"),
        (lambda: sdpa(Q, Q, Q, memory_budget="1e400"), ValueError, "memory_budget must be between 1 byte and 2\\*\\*63 bytes, got '1e400'"),
        (lambda: mha_cupy.set_memory_budget("1e400"), ValueError, "memory_budget must be between"),
        (lambda: sdpa(Q, Q, Q, scale=10**400), ValueError, "scale must be a finite float or None"),
        (lambda: layer(softmax_scale=10**400), ValueError, "scale must be a finite float or None"),
        (lambda: layer(init_gain=10**400), ValueError, "init_gain must be a finite float"),
        (lambda: layer(init_gain=float("nan")), ValueError, "init_gain must be a finite float, got nan"),
        (lambda: layer(init_gain=float("inf")), ValueError, "init_gain must be a finite float, got inf"),
        (lambda: sdpa(None, Q, Q), TypeError, "q must be an array, got None"),
        (lambda: layer()(None), TypeError, "x must be an array, got None"),
        (lambda: broadcast_kv_across_heads(None, 2), TypeError, "kv must be an array, got None"),
        (lambda: broadcast_kv_across_heads(Q, 10**20), ValueError, "n=100000000000000000000 asks for a view"),
        (lambda: _torch_layer(device="bogus"), ValueError, "device must be a torch device .* got 'bogus'"),
        (lambda: _torch_layer(device="cuda"), ValueError, "device 'cuda' is not available here"),
        (lambda: (require("torch"), layer().to("torch", device="cuda")), ValueError,
         "device 'cuda' is not available here"),
        (lambda: layer(device="gpu"), ValueError, "device must be one of numpy's devices \\['cpu'\\], got 'gpu'"),
        (lambda: layer(dtype=None), TypeError, "dtype must be one of the floating dtypes .* got None"),
        (lambda: convert_sd({"in_proj_weight": np.zeros((24, 8)), "out_proj.weight": np.zeros((8, 8))}, 2,
                            disable_stacked_w_qkv="no"), TypeError, "disable_stacked_w_qkv must be a bool"),
        (lambda: layer(seed=np.int64(-1)), ValueError, r"seed must be an int in \[0, 2\*\*64\), got -1"),
    ],
)
def test_listed_bad_calls(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_numpy_scalars_are_accepted_like_their_python_twins():
    m = layer(seed=np.int64(3), emsize=np.int64(8), init_gain=np.float32(0.5))
    assert m.seed == 3 and isinstance(m.seed, int) and m.emsize == 8
    q = np.random.default_rng(0).standard_normal((1, 4, 2, 3))
    expected = naive_attention(q, q, q, scale=0.5)
    got = sdpa(q, q, q, scale=np.float32(0.5), q_chunk_size=np.int64(2), kv_chunk_size=np.int32(3), workers=np.int8(2))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_zero_lengths_give_empty_or_zero_outputs():
    m = layer()
    empty = m(np.ones((2, 0, 8)))
    assert empty.shape == (2, 0, 8)
    no_keys = m(X, np.ones((2, 0, 8)))
    assert no_keys.shape == X.shape and np.all(no_keys == 0)  # no visible key: zeros, like a fully masked row
    np.testing.assert_allclose(m(X, np.ones((2, 0, 8)), add_input=True), X, rtol=0, atol=0)


# -- messages that say what to do ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("call", "words"), [
    (lambda: mha_cupy.scaled_dot_product_attention(*[np.zeros((1, 2, 2, 4))] * 3, is_casual=True),
     r"scaled_dot_product_attention\(\) got an unexpected keyword argument 'is_casual'; did you mean 'is_causal'\?"),
    (lambda: mha_cupy.MultiHeadAttention(emsize=8, nhead=2, d_k=4, d_v=4, dtyp="float64"),
     r"MultiHeadAttention.__init__\(\) got an unexpected keyword argument 'dtyp'; did you mean 'dtype'\?"),
    (lambda: mha_cupy.compare(np.zeros(2), np.zeros(2), rtoll=1e-3), "did you mean 'rtol'"),
    (lambda: mha_cupy.set_memory_budget(valu=1), "did you mean 'value'"),
])
def test_misspelt_keywords_name_the_closest_one(call, words):
    with pytest.raises(TypeError, match=words):
        call()


def test_a_wrong_input_dtype_says_what_to_do():
    layer = mha_cupy.MultiHeadAttention(emsize=8, nhead=2, d_k=4, d_v=4, seed=0)
    with pytest.raises(TypeError, match=r"x must have dtype float32, got float64 \(no implicit casts\): cast x to "
                                        r"float32, or build the layer with dtype=float64"):
        layer(np.zeros((1, 3, 8)))
    with pytest.raises(TypeError, match=r"x must have dtype float32, got int64 \(no implicit casts\): cast x to "
                                        r"float32$"):  # no layer of an integer dtype to suggest
        layer(np.zeros((1, 3, 8), dtype=np.int64))


def test_jax_float64_without_x64_names_the_switch():
    jax = require("jax")
    from mha_cupy._backends import resolve_backend

    be = resolve_backend("jax")
    if "float64" in be.float_dtypes():  # the test session switches x64 on: ask a fresh process
        code = ("import mha_cupy\ntry:\n    mha_cupy.MultiHeadAttention(emsize=8, nhead=2, d_k=4, d_v=4, xp='jax', "
                "dtype='float64')\nexcept TypeError as e:\n    print(e)")
        import subprocess
        import sys

        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    else:
        with pytest.raises(TypeError) as info:
            mha_cupy.MultiHeadAttention(emsize=8, nhead=2, d_k=4, d_v=4, xp="jax", dtype="float64")
        out = str(info.value)
    assert "jax.config.update('jax_enable_x64', True)" in out, out
    del jax


def test_backend_unavailable_error_is_public_under_its_name():
    assert mha_cupy.BackendUnavailableError.__module__ == "mha_cupy"
    assert repr(mha_cupy.BackendUnavailableError("x", library="cupy", reason="no-device")).startswith(
        "BackendUnavailableError(") and f"{mha_cupy.BackendUnavailableError.__module__}.BackendUnavailableError" == \
        "mha_cupy.BackendUnavailableError"


def _torch_dtype_layer():
    torch = require("torch")
    return layer(dtype=torch.float32)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: layer(xp="pytorch"), ValueError, "got 'pytorch'; did you mean 'torch'\\?"),
    (lambda: layer(xp="np"), ValueError, "did you mean 'numpy'\\?"),
    (lambda: layer(xp="jaxx"), ValueError, "did you mean 'jax'\\?"),
    (_torch_dtype_layer, TypeError, "got torch.float32 \\(a dtype of torch: pass xp='torch', or the dtype's name\\)"),
    (lambda: sdpa(np.ones((1, 5, 2, 4)), np.ones((1, 7, 2, 4)), np.ones((1, 7, 2, 4)), mask=np.ones((5, 7), bool)),
     ValueError, "a \\[q_len, kv_len\\] mask \\(torch's layout\\) is mask\\[None, :, None, :\\] here"),
], ids=["pytorch", "np", "jaxx", "torch dtype", "torch mask"])
def test_messages_say_what_was_meant(call, exc, match):
    """The names and layouts of other libraries get the fix in the message."""
    with pytest.raises(exc, match=match):
        call()
