"""A layer call is resolved into a plan before anything changes: what the plan holds, and that
a refused call leaves cache, cache length and dropout stream exactly as they were."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import direct, layer_keep_mask
from mha_cupy import MultiHeadAttention
from mha_cupy._layer_plan import CallOptions, plan_call


def make(**kw):
    return MultiHeadAttention(**{**dict(emsize=16, nhead=4, d_k=4, d_v=4, dropout_p=0.3, dtype="float64", seed=0), **kw})


def options(**kw):
    return CallOptions(**kw)  # the call's defaults for everything not given


def test_unknown_keywords_name_the_closest_one():
    layer = make()
    x = np.zeros((2, 3, 16))
    with pytest.raises(TypeError, match=r"MultiHeadAttention.__call__ got an unexpected keyword argument 'cache_k'; did you mean 'cache_kv'\?"):
        layer(x, cache_k=True)
    with pytest.raises(TypeError, match=r"MultiHeadAttention.vjp got an unexpected keyword argument 'bogus'; the keywords are cache_kv, "):
        layer.vjp(x, x, bogus=1)


def test_call_signature_shows_the_options_and_their_defaults():
    import inspect

    params = inspect.signature(MultiHeadAttention.__call__).parameters
    assert list(params)[:3] == ["self", "x", "x_kv"]
    assert {n: p.default for n, p in list(params.items())[3:]} == {
        f.name: f.default for f in __import__("dataclasses").fields(CallOptions)}


def test_plan_resolves_parts_cache_and_dropout(backend):
    layer = make().to(backend.xp, device=backend.device)
    x = backend.asarray(np.zeros((7, 5, 16)))
    plan = plan_call(layer._state(), x, None, options(save_peak_mem_factor=3, allow_inplace=True, training=True, cache_kv=True))
    assert plan.parts == ((0, 3), (3, 6), (6, 7)) and plan.kv_source == "self" and plan.cache_mode == "replace"
    assert plan.cache_shapes == ((7, 5, 2, 4, 4),)
    assert plan.write_into_x == backend.adapter.item_assignment  # JAX concatenates instead
    assert plan.attention.dropout_key is not None and layer._calls == 0 and layer._cache is None


def test_refused_calls_change_nothing():
    rng = np.random.default_rng(0)
    x, x_new = rng.standard_normal((2, 5, 16)), rng.standard_normal((2, 3, 16))
    layer, twin = make(), make()
    layer(x, cache_kv=True)
    before = np.array(layer.kv_cache, copy=True)
    with pytest.raises(ValueError, match="workers must be an int >= 1, got 0"):
        layer(x[:, :3], cache_kv=True, workers=0)
    with pytest.raises(ValueError, match="q_chunk_size must be an int >= 1, got 0"):
        layer(x, cache_kv=True, append_kv=True, q_chunk_size=0)
    with pytest.raises(ValueError, match="memory_budget of 1 bytes is too small"):
        layer(x, training=True, memory_budget=1)
    np.testing.assert_array_equal(layer.kv_cache, before)
    assert layer._calls == 0
    # The dropout stream did not advance: the next training call draws the first mask, like the twin's.
    got = layer(x_new, training=True)
    np.testing.assert_array_equal(got, twin(x_new, training=True))
    np.testing.assert_allclose(got, direct(layer, x_new, keep=layer_keep_mask(layer, 0, 2, 3, 3)), rtol=0, atol=1e-12)
