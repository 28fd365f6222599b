"""A generated battery of bad calls over the public API.

Every bad call must raise ValueError or TypeError whose message names the
argument, and a failed call on a layer must leave its weights, cache, cache
length and dropout counter exactly as they were.
"""

from __future__ import annotations

import math
from dataclasses import fields

import numpy as np
import pytest

import mha_cupy
from mha_cupy import MultiHeadAttention, broadcast_kv_across_heads
from mha_cupy import convert_torch_nn_multihead_attention_state_dict as convert_sd
from mha_cupy import scaled_dot_product_attention as sdpa
from mha_cupy._layer_plan import CallOptions

BAD_INT = [0, -1, 1.5, True, "3", None, math.nan]
BAD_OPTIONAL_INT = [0, -2, 2.5, False, "4", math.inf]
BAD_BOOL = [1, 0, "yes", None, 1.0]
BAD_PROBABILITY = [-0.1, 1.5, "0.5", True, math.nan, math.inf]
BAD_FINITE = ["x", True, math.nan, math.inf, -math.inf, 10**400]
BAD_BUDGET = [0, -5, "lots", "1e400", 1.5, True, "12 parsecs", ""]
BAD_SEED = [-1, 2**64, 1.5, "7", True]
CONSTRUCTOR = dict(emsize=8, nhead=4, d_k=2, d_v=2, dropout_p=0.2, dtype="float64", seed=0)


def constructor_calls():
    for name in ("emsize", "nhead", "d_k", "d_v", "share_kv_across_n_heads"):
        for bad in BAD_INT:
            yield f"MultiHeadAttention({name}={bad!r})", name, {**CONSTRUCTOR, name: bad}
    for name, values in (("dropout_p", BAD_PROBABILITY), ("softmax_scale", BAD_FINITE), ("init_gain", BAD_FINITE),
                         ("initialize_output_to_zero", BAD_BOOL), ("seed", BAD_SEED),
                         ("dtype", ["int8", None, 3, "float128", "complex64"]), ("xp", ["tensorflow", 3, 2.0]),
                         ("device", ["gpu", "cuda:0", 7])):
        for bad in values:
            yield f"MultiHeadAttention({name}={bad!r})", name, {**CONSTRUCTOR, name: bad}
    yield "share_kv_across_n_heads=3", "share_kv_across_n_heads", {**CONSTRUCTOR, "share_kv_across_n_heads": 3}
    for name, arr in (("precomputed_k", np.zeros((1, 2, 4, 2))), ("precomputed_kv", np.zeros((1, 2, 2, 3, 2))),
                      ("precomputed_kv", np.zeros((1, 2, 2, 4, 2), dtype=np.float32)), ("precomputed_kv", [[0.0]])):
        yield f"{name} bad", name, {**CONSTRUCTOR, name: arr}


@pytest.mark.parametrize("what,name,kwargs", list(constructor_calls()), ids=lambda v: v if isinstance(v, str) else "")
def test_constructor(what, name, kwargs):
    with pytest.raises((ValueError, TypeError)) as info:
        MultiHeadAttention(**kwargs)
    assert name.split("_")[0] in str(info.value) or name in str(info.value), f"{what}: {info.value}"


X = np.random.default_rng(0).standard_normal((2, 3, 8))


def call_cases():
    for name in (f.name for f in fields(CallOptions) if f.default is False):
        for bad in BAD_BOOL:
            yield f"{name}={bad!r}", name, (X,), {name: bad}
    for name in ("q_chunk_size", "kv_chunk_size", "workers"):
        for bad in BAD_OPTIONAL_INT:
            yield f"{name}={bad!r}", name, (X,), {name: bad}
    for bad in [1, 0, -3, 2.5, True, "2"]:
        yield f"save_peak_mem_factor={bad!r}", "save_peak_mem_factor", (X,), {"save_peak_mem_factor": bad, "allow_inplace": True}
    for bad in BAD_BUDGET:
        yield f"memory_budget={bad!r}", "memory_budget", (X,), {"memory_budget": bad}
    bad_x = [None, X.tolist(), X[0, 0], X[..., :7], X.astype(np.float32), X.astype(np.int64), np.ones((2, 3, 8), dtype=bool)]
    for i, bad in enumerate(bad_x):
        yield f"x bad {i}", "x", (bad,), {}
    for i, bad in enumerate([X[:1], X[..., :6], X.tolist(), X.astype(np.float32)]):
        yield f"x_kv bad {i}", "x_kv", (X, bad), {}
    yield "x_kv with use_cached_kv", "x_kv", (X, X.copy()), {"use_cached_kv": True}
    yield "cache batch mismatch", "cache", (X[:1],), {"use_cached_kv": True}
    yield "append layout mismatch", "append_kv", (X,), {"cache_kv": True, "append_kv": True, "only_cache_first_head_kv": True}
    yield "cache_kv with use_cached_kv", "use_cached_kv", (X,), {"cache_kv": True, "use_cached_kv": True}
    yield "append without cache", "append_kv", (X,), {"append_kv": True}
    yield "factor without inplace", "save_peak_mem_factor", (X,), {"save_peak_mem_factor": 2}
    yield "reuse without x_kv", "reuse_first_head_kv", (X,), {"reuse_first_head_kv": True}
    yield "budget too small", "memory_budget", (X,), {"memory_budget": 16}


def snapshot(m):
    state = {n: np.array(getattr(m, n), copy=True) for n in ("w_qkv", "w_out") if getattr(m, n) is not None}
    state["cache"] = np.array(m.kv_cache, copy=True)
    state["cache_capacity"] = m._cache.arrays[0].shape[1]
    state["cache_length"] = m._cache.length
    state["calls"] = m._calls
    return state


@pytest.mark.parametrize("what,name,args,kwargs", list(call_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_layer_call(what, name, args, kwargs):
    m = MultiHeadAttention(**CONSTRUCTOR)
    m(X, cache_kv=True, append_kv=True)  # a cache with spare capacity, as streaming leaves it
    before = snapshot(m)
    with pytest.raises((ValueError, TypeError)) as info:
        m(*args, training=kwargs.pop("training", True), **kwargs)
    assert name in str(info.value), f"{what}: {info.value}"
    after = snapshot(m)
    assert after.keys() == before.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=f"{what} changed {key}")
    # The dropout stream did not advance: the next training call draws call 0's mask, like a twin's.
    np.testing.assert_array_equal(m(X, training=True), MultiHeadAttention(**CONSTRUCTOR)(X, training=True))


Q = np.random.default_rng(1).standard_normal((2, 5, 4, 3))
KV = np.random.default_rng(2).standard_normal((2, 6, 2, 3))


def sdpa_cases():
    for name, values in (("scale", BAD_FINITE), ("dropout_p", BAD_PROBABILITY), ("is_causal", BAD_BOOL),
                         ("return_lse", BAD_BOOL), ("batch_invariant", BAD_BOOL), ("memory_budget", BAD_BUDGET)):
        for bad in values:
            if name == "scale" and bad is None:
                continue
            yield f"{name}={bad!r}", name, (Q, KV, KV), {name: bad}
    for name in ("q_chunk_size", "kv_chunk_size", "workers"):
        for bad in BAD_OPTIONAL_INT:
            yield f"{name}={bad!r}", name, (Q, KV, KV), {name: bad}
    for bad in BAD_SEED:
        yield f"seed={bad!r}", "seed", (Q, KV, KV), {"seed": bad, "dropout_p": 0.1}
    arrays = {"q": [None, Q[0], Q.astype(np.int32), Q.tolist(), Q[..., None], 3.0],
              "k": [None, KV[:1], KV[..., :2], KV.astype(np.float32), KV[:, :, :1][..., None]],
              "v": [None, KV[:, :5], KV[..., :, :0].tolist(), KV.astype(np.float32)]}
    for name, values in arrays.items():
        for i, bad in enumerate(values):
            args = {"q": Q, "k": KV, "v": KV, name: bad}
            yield f"{name} bad {i}", name, (args["q"], args["k"], args["v"]), {}
    for i, bad in enumerate([np.ones((5, 4, 6)), np.ones((3, 6), dtype=bool), np.ones((2, 5, 4, 6, 1), dtype=bool),
                             np.ones((2, 5, 4, 7), dtype=bool), [[True]]]):
        yield f"mask bad {i}", "mask", (Q, KV, KV), {"mask": bad}
    for i, bad in enumerate([np.ones(6, dtype=np.float32), np.ones((3, 6)), np.ones((2, 5, 4, 7)), np.ones(6, dtype=bool)]):
        yield f"bias bad {i}", "bias", (Q, KV, KV), {"bias": bad}
    yield "heads not a multiple", "heads", (Q[:, :, :3], KV, KV), {}


@pytest.mark.parametrize("what,name,args,kwargs", list(sdpa_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_scaled_dot_product_attention(what, name, args, kwargs):
    copies = [None if not isinstance(a, np.ndarray) else a.copy() for a in args]
    with pytest.raises((ValueError, TypeError)) as info:
        sdpa(*args, **kwargs)
    assert name in str(info.value), f"{what}: {info.value}"
    for a, c in zip(args, copies):
        if c is not None:
            np.testing.assert_array_equal(a, c)


def other_cases():
    m = MultiHeadAttention(**CONSTRUCTOR)
    w_qkv, w_out = np.asarray(m.w_qkv), np.asarray(m.w_out)
    for bad in [0, -1, 1.5, True, "2", None]:
        yield f"broadcast n={bad!r}", "n", lambda bad=bad: broadcast_kv_across_heads(KV, bad)
    for i, bad in enumerate([None, KV[0, 0, 0], [1.0, 2.0]]):
        yield f"broadcast kv {i}", "kv", lambda bad=bad: broadcast_kv_across_heads(bad, 2)
    for bad in BAD_BUDGET + [None.__class__]:
        yield f"set_memory_budget({bad!r})", "memory_budget", lambda bad=bad: mha_cupy.set_memory_budget(bad)
    for name, arr in (("w_qkv", w_qkv[..., :7]), ("w_qkv", w_qkv.astype(np.float32)), ("w_qkv", w_qkv.tolist()),
                      ("w_out", w_out[None]), ("w_out", w_out.astype(np.float32))):
        kw = {"w_out": w_out, "w_qkv": w_qkv, name: arr}
        yield f"set_parameters {name}", name, lambda kw=kw: m.set_parameters(**kw)
    yield "set_parameters w_out None", "w_out", lambda: m.set_parameters(None, w_qkv=w_qkv)
    yield "set_parameters both", "w_q", lambda: m.set_parameters(w_out, w_q=w_qkv[:1], w_qkv=w_qkv)
    for bad in ["tensorflow", 3]:
        yield f".to({bad!r})", "xp", lambda bad=bad: m.to(bad)
    yield ".to(device='gpu')", "device", lambda: m.to("numpy", device="gpu")
    sd = {"in_proj_weight": np.zeros((24, 8)), "out_proj.weight": np.zeros((8, 8))}
    for bad in [0, -1, 2.0, True, 3]:
        yield f"convert nhead={bad!r}", "nhead", lambda bad=bad: convert_sd(sd, bad)
    for bad in BAD_BOOL:
        yield f"convert disable_stacked_w_qkv={bad!r}", "disable_stacked_w_qkv", \
            lambda bad=bad: convert_sd(sd, 2, disable_stacked_w_qkv=bad)
    yield "convert state_dict list", "state_dict", lambda: convert_sd([], 2)
    yield "convert missing key", "in_proj_weight", lambda: convert_sd({}, 2)
    yield "convert bias", "in_proj_bias", lambda: convert_sd({**sd, "in_proj_bias": np.ones(24)}, 2)
    yield "convert xp", "xp", lambda: convert_sd(sd, 2, xp="tensorflow")
    yield "convert device", "device", lambda: convert_sd(sd, 2, xp="numpy", device="gpu")


@pytest.mark.parametrize("what,name,call", list(other_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_other_functions(what, name, call):
    previous = mha_cupy.set_memory_budget(None)
    try:
        with pytest.raises((ValueError, TypeError)) as info:
            call()
        assert name in str(info.value), f"{what}: {info.value}"
        assert mha_cupy.set_memory_budget(None) is None  # a refused budget leaves the default alone
    finally:
        mha_cupy.set_memory_budget(previous)


def test_the_battery_is_large():
    count = len(list(constructor_calls())) + len(list(call_cases())) + len(list(sdpa_cases())) + len(list(other_cases()))
    assert count >= 300, count
