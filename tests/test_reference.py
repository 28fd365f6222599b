"""The layer against TabPFN 2.2.1's live ``MultiHeadAttention`` on random shapes, its own
improvements over the reference, and its bad-input battery."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_matches_reference, naive_attention, require
from mha_cupy import MultiHeadAttention
from mha_cupy._reference import layer_like, reference_layer

torch = require("torch", reason="differential tests need torch (pip install mha_cupy[reference])")
require("tabpfn", reason="differential tests need tabpfn 2.2.1 (pip install mha_cupy[reference])")

pytestmark = pytest.mark.reference


def random_config(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    nhead = int(rng.choice([1, 2, 3, 4, 6]))
    share = int(rng.choice([s for s in (1, 2, 3, 6) if nhead % s == 0]))
    d_k = int(rng.integers(1, 9))
    d_v = d_k if rng.random() < 0.5 else int(rng.integers(1, 9))
    return dict(
        emsize=nhead * int(rng.integers(1, 5)), nhead=nhead, d_k=d_k, d_v=d_v, share_kv_across_n_heads=share,
        softmax_scale=None if rng.random() < 0.7 else float(rng.uniform(0.1, 2.0)),
        lead=tuple(int(n) for n in rng.integers(1, 4, size=int(rng.integers(1, 3)))),
        q_len=int(rng.integers(1, 10)), kv_len=int(rng.integers(1, 10)), cross=bool(rng.random() < 0.5),
        dtype=str(rng.choice(["float64", "float32"])),
    )


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def setup(seed: int, backend=None):
    cfg = random_config(seed)
    ref = reference_layer(emsize=cfg["emsize"], nhead=cfg["nhead"], d_k=cfg["d_k"], d_v=cfg["d_v"],
                          share_kv_across_n_heads=cfg["share_kv_across_n_heads"], softmax_scale=cfg["softmax_scale"],
                          dtype=cfg["dtype"], seed=seed)
    kw = {} if backend is None else dict(xp=backend.xp, device=backend.device)
    ours = layer_like(ref, **kw)
    rng = np.random.default_rng(seed + 10_000)
    x = rng.standard_normal((*cfg["lead"], cfg["q_len"], cfg["emsize"])).astype(cfg["dtype"])
    x_kv = rng.standard_normal((*cfg["lead"], cfg["kv_len"], cfg["emsize"])).astype(cfg["dtype"]) if cfg["cross"] else None
    return cfg, ref, ours, x, x_kv


SEEDS = range(24)


@pytest.mark.parametrize("seed", SEEDS)
def test_plain_call_matches_reference(seed, backend):
    cfg, ref, ours, x, x_kv = setup(seed, backend)
    with torch.no_grad():
        expected = ref(t(x), None if x_kv is None else t(x_kv)).numpy()
    got = ours(backend.asarray(x), None if x_kv is None else backend.asarray(x_kv))
    assert_matches_reference(got, expected, xp=backend.xp, dtype=backend.dtype(cfg["dtype"]), device=backend.device)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("option", ["add_input", "save_peak_mem_factor", "reuse_first_head_kv", "chunked"])
def test_options_match_reference(seed, option):
    cfg, ref, ours, x, x_kv = setup(seed)
    kwargs, extra = {}, {}
    if option == "add_input":
        kwargs = dict(add_input=True)
    elif option == "save_peak_mem_factor":
        kwargs = dict(add_input=bool(seed % 2), allow_inplace=True, save_peak_mem_factor=2 + seed % 3)
    elif option == "reuse_first_head_kv":
        if x_kv is None:
            x_kv = x[..., ::-1, :].copy()
        kwargs = dict(reuse_first_head_kv=True)
    else:
        extra = dict(q_chunk_size=1 + seed % 3, kv_chunk_size=1 + seed % 4)
    with torch.no_grad():
        expected = ref(t(x.copy()), None if x_kv is None else t(x_kv), **kwargs).numpy()
    x_in = x.copy()
    got = ours(x_in, x_kv, **kwargs, **extra)
    assert_matches_reference(got, expected, xp=ours.xp, dtype=ours.dtype)
    if not kwargs.get("allow_inplace"):
        np.testing.assert_array_equal(x_in, x)  # inputs untouched


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("first_head", [False, True])
def test_cache_then_use_cached_matches_reference(seed, first_head, backend):
    cfg, ref, ours, x, x_kv = setup(seed, backend)
    rng = np.random.default_rng(seed)
    x_new = rng.standard_normal((*cfg["lead"], 3, cfg["emsize"])).astype(cfg["dtype"])
    src = x_kv if x_kv is not None else x.copy()  # a distinct tensor: the reference cannot cache its w_qkv self path
    with torch.no_grad():
        out_cache = ref(t(x), t(src), cache_kv=True, only_cache_first_head_kv=first_head).numpy()
        if first_head and ref._k_cache is not None:
            # The reference ignores the flag on its w_k/w_v path; ours caches the first head there too.
            ref._k_cache, ref._v_cache = ref._k_cache[..., :1, :], ref._v_cache[..., :1, :]
        out_used = ref(t(x_new), use_cached_kv=True).numpy()
    xb = backend.asarray(x)
    got_cache = ours(xb, None if x_kv is None else backend.asarray(x_kv), cache_kv=True, only_cache_first_head_kv=first_head)
    got_used = ours(backend.asarray(x_new), use_cached_kv=True)
    dt = backend.dtype(cfg["dtype"])
    assert_matches_reference(got_cache, out_cache, xp=backend.xp, dtype=dt, what="caching call")
    assert_matches_reference(got_used, out_used, xp=backend.xp, dtype=dt, what="cached call")
    for name in ("kv_cache", "k_cache", "v_cache"):
        ref_c = getattr(ref, "_" + name)
        if ref_c is None:
            assert getattr(ours, name) is None
        else:
            assert_matches_reference(getattr(ours, name), ref_c.numpy(), xp=backend.xp, dtype=dt, what=name)


def test_precomputed_kv_matches_reference():
    rng = np.random.default_rng(5)
    pre = rng.standard_normal((3, 7, 2, 2, 4))
    ref = reference_layer(emsize=12, nhead=4, d_k=4, d_v=4, share_kv_across_n_heads=2, precomputed_kv=pre, seed=5)
    ours = layer_like(ref)
    assert ours.w_kv is None and ours.w_qkv is None and ours.has_cached_kv
    x = rng.standard_normal((3, 5, 12))
    with torch.no_grad():
        expected = ref(t(x), use_cached_kv=True).numpy()
    assert_matches_reference(ours(x, use_cached_kv=True), expected, xp=ours.xp, dtype=ours.dtype)


def test_initialisation_matches_reference_distribution():
    # Same bounds as the reference: compare max |w| and std for a large layer.
    from scipy import stats

    ref = reference_layer(emsize=96, nhead=6, d_k=16, d_v=24, share_kv_across_n_heads=2, init_gain=1.5, seed=0)
    ours = MultiHeadAttention(emsize=96, nhead=6, d_k=16, d_v=24, share_kv_across_n_heads=2, init_gain=1.5,
                              dtype="float64", seed=3)
    for name in ("w_q", "w_k", "w_v", "w_out"):
        r = getattr(ref, name).detach().numpy().ravel()
        o = np.asarray(getattr(ours, name)).ravel()
        assert o.shape == r.shape, name
        assert stats.ks_2samp(r, o).pvalue > 1e-4, name


# -- where the reference is wrong, ours does better ------------------------------------------------


def test_cache_kv_on_stacked_self_attention_caches():
    ref = reference_layer(emsize=16, nhead=2, d_k=8, d_v=8, seed=1)
    x = np.random.default_rng(1).standard_normal((2, 5, 16))
    with pytest.raises(TypeError), torch.no_grad():
        ref(t(x), cache_kv=True)  # the reference fails here
    ours = layer_like(ref)
    out = ours(x, cache_kv=True)
    with torch.no_grad():
        expected = ref(t(x)).numpy()
        ref(t(x), t(x.copy()), cache_kv=True)
    assert_matches_reference(out, expected, xp=ours.xp, dtype=ours.dtype)
    assert_matches_reference(ours.kv_cache, ref._kv_cache.numpy(), xp=ours.xp, dtype=ours.dtype)


def test_precomputed_k_and_v_together_are_accepted():
    rng = np.random.default_rng(2)
    k, v = rng.standard_normal((2, 6, 2, 4)), rng.standard_normal((2, 6, 2, 3))
    ours = MultiHeadAttention(emsize=8, nhead=4, d_k=4, d_v=3, share_kv_across_n_heads=2, precomputed_k=k,
                              precomputed_v=v, dtype="float64", seed=0)
    x = rng.standard_normal((2, 5, 8))
    q = (x @ np.asarray(ours.w_q)[0].reshape(-1, 8).T).reshape(2, 5, 4, 4)
    expected = naive_attention(q, k, v).reshape(2, 5, 12) @ np.asarray(ours.w_out).reshape(12, 8)
    assert_matches_reference(ours(x, use_cached_kv=True), expected, xp=ours.xp, dtype=ours.dtype)


def test_reuse_first_head_kv_without_x_kv_raises():
    ours = MultiHeadAttention(emsize=8, nhead=2, d_k=4, d_v=4, dtype="float64", seed=0)
    with pytest.raises(ValueError, match="reuse_first_head_kv.*x_kv"):
        ours(np.zeros((1, 3, 8)), reuse_first_head_kv=True)


def test_only_cache_first_head_kv_is_honoured_on_k_v_layout():
    rng = np.random.default_rng(3)
    ours = MultiHeadAttention(emsize=8, nhead=4, d_k=4, d_v=3, dtype="float64", seed=0)
    x, x_new = rng.standard_normal((2, 5, 8)), rng.standard_normal((2, 3, 8))
    ours(x, cache_kv=True, only_cache_first_head_kv=True)
    assert ours.k_cache.shape == (2, 5, 1, 4) and ours.v_cache.shape == (2, 5, 1, 3)
    k = (x @ np.asarray(ours.w_k)[:1].reshape(-1, 8).T).reshape(2, 5, 1, 4)
    v = (x @ np.asarray(ours.w_v)[:1].reshape(-1, 8).T).reshape(2, 5, 1, 3)
    q = (x_new @ np.asarray(ours.w_q)[0].reshape(-1, 8).T).reshape(2, 3, 4, 4)
    expected = naive_attention(q, k, v).reshape(2, 3, 12) @ np.asarray(ours.w_out).reshape(12, 8)
    assert_matches_reference(ours(x_new, use_cached_kv=True), expected, xp=ours.xp, dtype=ours.dtype)


@pytest.mark.parametrize("d_v", [3, 5])
def test_reuse_first_head_kv_with_cache_kv_caches_the_shared_head(d_v):
    rng = np.random.default_rng(4)
    ref = reference_layer(emsize=12, nhead=4, d_k=3, d_v=d_v, share_kv_across_n_heads=2, seed=4)
    ours = layer_like(ref)
    x, x_kv, x_new = (rng.standard_normal((2, n, 12)) for n in (3, 5, 2))
    if d_v != 3:
        with pytest.raises(RuntimeError), torch.no_grad():
            ref(t(x), t(x_kv), cache_kv=True, reuse_first_head_kv=True)  # its w_k/w_v path cannot store it
    out = ours(x, x_kv, cache_kv=True, reuse_first_head_kv=True)
    cached = ours.kv_cache if d_v == 3 else ours.k_cache
    assert cached.shape[-2] == 1
    with torch.no_grad():
        expected = ref(t(x), t(x_kv), reuse_first_head_kv=True).numpy()
        # Caching the first head and sharing it is what the reference's w_kv path does.
        ref(t(x), t(x_kv), cache_kv=True, only_cache_first_head_kv=True)
        if d_v != 3:
            ref._k_cache, ref._v_cache = ref._k_cache[..., :1, :], ref._v_cache[..., :1, :]
        expected_used = ref(t(x_new), use_cached_kv=True).numpy()
    assert_matches_reference(out, expected, xp=ours.xp, dtype=ours.dtype)
    assert_matches_reference(ours(x_new, use_cached_kv=True), expected_used, xp=ours.xp, dtype=ours.dtype)


def test_dropout_only_in_training():
    rng = np.random.default_rng(6)
    ref = reference_layer(emsize=16, nhead=4, d_k=4, d_v=4, dropout_p=0.5, seed=6)
    ours = layer_like(ref, seed=11)
    x = rng.standard_normal((2, 6, 16))
    ref.dropout_p = None
    with torch.no_grad():
        expected = ref(t(x)).numpy()
    assert_matches_reference(ours(x), expected, xp=ours.xp, dtype=ours.dtype)  # inference: no dropout
    a, b = ours(x, training=True), ours(x, training=True)
    assert np.abs(a - expected).max() > 1e-3  # training: dropout applied
    assert np.abs(a - b).max() > 1e-3  # a fresh mask per call
    again = layer_like(reference_layer(emsize=16, nhead=4, d_k=4, d_v=4, dropout_p=0.5, seed=6), seed=11)
    np.testing.assert_array_equal(again(x, training=True), a)  # reproducible from the seed


@pytest.mark.parametrize("factor", [None, 2])
def test_tabpfn_multiquery_item_attention_sequence(factor):
    """The call sequence of TabPFN's PerFeatureEncoderLayer with multiquery test-set attention:
    train rows attend to themselves and cache the first head; test rows then use that cache,
    every call residual and (with save_peak_mem_factor) in place."""
    rng = np.random.default_rng(99)
    ref = reference_layer(emsize=16, nhead=4, d_k=4, d_v=4, dtype="float32", seed=99)
    ours = layer_like(ref)
    x_train = rng.standard_normal((3, 2, 7, 16)).astype(np.float32)  # [batch, features, items, emsize]
    x_test = rng.standard_normal((3, 2, 5, 16)).astype(np.float32)
    kw = dict(add_input=True, allow_inplace=True, save_peak_mem_factor=factor)
    with torch.no_grad():
        # copies: with save_peak_mem_factor the reference writes into its input
        r_train = ref(t(x_train.copy()), t(x_train.copy()), cache_kv=True, only_cache_first_head_kv=True, **kw).numpy()
        r_test = ref(t(x_test.copy()), None, use_cached_kv=True, reuse_first_head_kv=True, **kw).numpy()
    o_train = ours(x_train.copy(), x_train.copy(), cache_kv=True, only_cache_first_head_kv=True, **kw)
    o_test = ours(x_test.copy(), None, use_cached_kv=True, reuse_first_head_kv=True, **kw)
    assert_matches_reference(o_train, r_train, xp=ours.xp, dtype=ours.dtype, what="train rows")
    assert_matches_reference(o_test, r_test, xp=ours.xp, dtype=ours.dtype, what="test rows")
    assert_matches_reference(ours.kv_cache, ref._kv_cache.numpy(), xp=ours.xp, dtype=ours.dtype, what="first-head cache")
