"""Initialisation and conversion from ``torch.nn.MultiheadAttention``."""

from __future__ import annotations

import math

import numpy as np
import pytest

from helpers import assert_matches_reference, require, uniform_by_the_book
from mha_cupy import MultiHeadAttention, convert_torch_nn_multihead_attention_state_dict as convert_sd
from mha_cupy._backends import to_numpy
from mha_cupy._random import STREAMS
from mha_cupy.weights import input_weight_bound, output_weight_bound


def test_bounds_are_tabpfns():
    assert input_weight_bound(6, 16, 96, 1.5) == pytest.approx(math.sqrt(3) * 1.5 * math.sqrt(2 / (6 * 16 + 96)))
    assert output_weight_bound(6, 24, 96) == pytest.approx(math.sqrt(6 / (24 * 96 + 6 * 96)))


def test_init_is_uniform_within_bounds_and_identical_on_every_backend(backend):
    stats = require("scipy.stats")
    kw = dict(emsize=48, nhead=4, d_k=12, d_v=12, share_kv_across_n_heads=2, init_gain=0.5, seed=17)
    ours = MultiHeadAttention(dtype="float64", xp=backend.xp, device=backend.device, **kw)
    bound = input_weight_bound(4, 12, 48, 0.5)
    bounds = {"w_q": bound, "w_kv": bound, "w_out": output_weight_bound(4, 12, 48)}
    for name, b in bounds.items():  # weight = (2u - 1) * bound, u from the weight's Philox stream
        w = to_numpy(getattr(ours, name))
        u = uniform_by_the_book(17, STREAMS[name], w.size, 53).reshape(w.shape)
        np.testing.assert_array_equal(w, (u * 2.0 - 1.0) * b)
    w = to_numpy(ours.w_kv).ravel()
    assert np.abs(w).max() <= bound
    assert stats.kstest(w, stats.uniform(-bound, 2 * bound).cdf).pvalue > 1e-3


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_accelerators_draw_on_the_device_and_get_the_same_bits(backend, dtype, monkeypatch):
    kw = dict(emsize=20, nhead=4, d_k=5, d_v=3, share_kv_across_n_heads=2, dtype=dtype, seed=23)
    on_host = MultiHeadAttention(xp=backend.xp, device=backend.device, **kw)
    monkeypatch.setattr(type(backend.adapter), "is_cpu", lambda self, device: False)
    on_device = MultiHeadAttention(xp=backend.xp, device=backend.device, **kw)
    for name in ("w_q", "w_k", "w_v", "w_out"):
        np.testing.assert_array_equal(to_numpy(getattr(on_device, name)), to_numpy(getattr(on_host, name)), name)


@pytest.mark.parametrize("xp", ["numpy", "torch"])
def test_half_precision_weights_are_the_float32_draws_rounded_once(xp):
    require(xp)
    kw = dict(emsize=24, nhead=4, d_k=6, d_v=6, seed=7, xp=xp)
    full = MultiHeadAttention(dtype="float32", **kw)
    for name in ("float16", "bfloat16") if xp == "torch" else ("float16",):
        half = MultiHeadAttention(dtype=name, **kw)
        for w in ("w_qkv", "w_out"):
            expected = getattr(full, w)
            expected = expected.astype(np.float16) if xp == "numpy" else expected.to(getattr(half.xp, name))
            np.testing.assert_array_equal(to_numpy(getattr(half, w)), to_numpy(expected), f"{name} {w}")


def test_seeds_give_different_weights_and_zero_output_init():
    a = MultiHeadAttention(emsize=8, nhead=2, d_k=4, d_v=4, seed=1)
    b = MultiHeadAttention(emsize=8, nhead=2, d_k=4, d_v=4, seed=2)
    assert np.abs(np.asarray(a.w_qkv) - np.asarray(b.w_qkv)).max() > 0
    z = MultiHeadAttention(emsize=8, nhead=2, d_k=4, d_v=4, initialize_output_to_zero=True, seed=1)
    assert np.all(np.asarray(z.w_out) == 0)
    assert a.w_qkv.dtype == np.float32


@pytest.mark.parametrize("stacked", [True, False])
def test_state_dict_conversion_reproduces_torch_nn_multihead_attention(stacked):
    torch = require("torch", reason="needs torch")
    torch.manual_seed(0)
    nn = torch.nn.MultiheadAttention(24, 4, bias=False, batch_first=True, dtype=torch.float64)
    kwargs = convert_sd(nn.state_dict(), 4, disable_stacked_w_qkv=not stacked, xp="numpy")
    assert set(kwargs) == ({"w_qkv", "w_out"} if stacked else {"w_q", "w_kv", "w_out"})
    if not stacked:
        assert kwargs["w_q"].shape == (1, 4, 6, 24)
    layer = MultiHeadAttention(emsize=24, nhead=4, d_k=6, d_v=6, dtype="float64", seed=0)
    layer.set_parameters(**kwargs)
    assert (layer.w_qkv is None) != stacked
    x = np.random.default_rng(0).standard_normal((3, 5, 24))
    tx = torch.from_numpy(x)
    with torch.no_grad():
        expected = nn(tx, tx, tx, need_weights=False)[0].numpy()
    assert_matches_reference(layer(x), expected, xp=layer.xp, dtype=layer.dtype)


def test_state_dict_conversion_stays_in_torch_by_default():
    torch = require("torch", reason="needs torch")
    nn = torch.nn.MultiheadAttention(8, 2, bias=False)
    out = convert_sd(nn.state_dict(), 2)
    assert isinstance(out["w_qkv"], torch.Tensor) and out["w_qkv"].shape == (3, 2, 4, 8)
    assert not out["w_qkv"].requires_grad


def test_state_dict_bad_input():
    w = np.zeros((24, 8))
    with pytest.raises(ValueError, match="emsize must be divisible by nhead: emsize 8, got nhead 3"):
        convert_sd({"in_proj_weight": w, "out_proj.weight": np.zeros((8, 8))}, 3)
    with pytest.raises(ValueError, match=r"out_proj.weight must have shape \[8, 8\], got \[8, 4\]"):
        convert_sd({"in_proj_weight": w, "out_proj.weight": np.zeros((8, 4))}, 2)
    with pytest.raises(ValueError, match=r"in_proj_weight must have shape \[3 \* emsize, emsize\], got \[8, 8\]"):
        convert_sd({"in_proj_weight": np.zeros((8, 8)), "out_proj.weight": np.zeros((8, 8))}, 2)
    with pytest.raises(ValueError, match="must hold 'in_proj_weight'"):
        convert_sd({}, 2)
    with pytest.raises(ValueError, match="non-zero"):
        convert_sd({"in_proj_weight": w, "out_proj.weight": np.zeros((8, 8)), "in_proj_bias": np.ones(24)}, 2)
    with pytest.raises(TypeError, match="nhead must be an int"):
        convert_sd({"in_proj_weight": w, "out_proj.weight": np.zeros((8, 8))}, 2.0)
    ok = convert_sd({"in_proj_weight": w, "out_proj.weight": np.zeros((8, 8)), "in_proj_bias": np.zeros(24)}, 2)
    assert ok["w_qkv"].shape == (3, 2, 4, 8)


def test_weights_layout_reads_queries_keys_and_values_from_every_layout():
    from mha_cupy.weights import WEIGHT_NAMES, Weights

    rng = np.random.default_rng(9)
    N, K, H, V, E = 4, 2, 3, 5, 6
    w_out, w_q = rng.standard_normal((N, V, E)), rng.standard_normal((1, N, H, E))
    w_qkv = rng.standard_normal((3, N, H, E))
    stacked = Weights(w_out=w_out, w_qkv=w_qkv)
    assert stacked.has_kv and stacked.stacked_kv and list(stacked.present()) == ["w_out", "w_qkv"]
    np.testing.assert_array_equal(stacked.query(), w_qkv[:1])
    np.testing.assert_array_equal(stacked.key_value(1)[0], w_qkv[1:, :1])
    w_k, w_v = rng.standard_normal((K, H, E)), rng.standard_normal((K, V, E))
    split = Weights(w_out=w_out, w_q=w_q, w_k=w_k, w_v=w_v)
    kv, k, v = split.key_value(K)
    assert kv is None and not split.stacked_kv
    np.testing.assert_array_equal(k, w_k) and np.testing.assert_array_equal(v, w_v)
    precomputed = Weights(w_out=w_out, w_q=w_q)
    assert not precomputed.has_kv and precomputed.query() is w_q
    doubled = split.map(lambda a: a * 2)
    assert set(doubled.present()) == {"w_out", "w_q", "w_k", "w_v"} and set(WEIGHT_NAMES) >= set(doubled.present())
    np.testing.assert_array_equal(doubled.w_k, 2 * w_k)


def test_weights_of_another_library_get_the_way_to_convert_them():
    torch = require("torch")
    state = torch.nn.MultiheadAttention(32, 4, batch_first=True).state_dict()
    layer = MultiHeadAttention(emsize=32, nhead=4, d_k=8, d_v=8)
    with pytest.raises(TypeError, match=r"got torch: convert them \(convert_torch_nn_multihead_attention_state_dict"
                                        r"\(\.\.\., xp='numpy'\)\), or move the layer to theirs first"):
        layer.set_parameters(**convert_sd(state, 4))
    layer.set_parameters(**convert_sd(state, 4, xp="numpy"))  # the way the message gives
