"""``mha_cupy.tabpfn``: mha_cupy as TabPFN 9's attention backend, checked against TabPFN's own path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import array_api_compat
import pytest
import torch
from conftest import KV_DTYPES, N_TEST, TOL, Spy, random_model, run_model, scaled_error
from tabpfn.architectures.kv_cache import QuantizedKVCacheEntry
from tabpfn.architectures.shared import attention_backends
from tabpfn.architectures.shared.attention_backends import AttentionSpec

import mha_cupy
import mha_cupy.tabpfn
from mha_cupy.tabpfn import TabPFNAttentionBackend

CASES = [("v3", "int8"), ("v3", "fp8"), ("v3", "dense"), ("v2.6", "dense")]  # TabPFN-2.6 has no quantized cache
ROOT = Path(__file__).resolve().parent.parent


def problems(kind: str, kv: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What is wrong with mha_cupy under ``policy="all"`` on model ``kind`` with KV cache ``kv``: calls that
    were not ours, calls whose output is off TabPFN's own on the same inputs, model outputs off TabPFN's."""
    model = random_model(kind)
    reference = run_model(model, KV_DTYPES[kv])
    spy = Spy()
    monkeypatch.setattr(TabPFNAttentionBackend, "run", spy.wrap(TabPFNAttentionBackend.run))
    mha_cupy.tabpfn.register(policy="all")
    try:
        ours = run_model(model, KV_DTYPES[kv])
    finally:
        mha_cupy.tabpfn.unregister()
    found = []
    if any(c is None or c.name != "mha_cupy" for c in ours.calls) or len(ours.calls) != len(reference.calls):
        found.append(f"calls not ours: {[getattr(c, 'name', None) for c in ours.calls]}")
    found += [f"call {i}: error {r.error:.2e}" for i, r in enumerate(spy.records) if not r.error <= TOL]
    for name in ("plain", "cached"):
        err = scaled_error(getattr(ours, name), getattr(reference, name))
        if not err <= TOL:
            found.append(f"{name} output: error {err:.2e}")
    return found


@pytest.mark.parametrize(("kind", "kv"), CASES)
def test_every_call_ours_and_equal_to_tabpfn(kind, kv, monkeypatch):
    assert problems(kind, kv, monkeypatch) == []


def _reverse_kv_heads(q: Any, k: Any, v: Any, **kw: Any) -> Any:
    xp = array_api_compat.array_namespace(k)
    return mha_cupy.scaled_dot_product_attention(q, xp.flip(k, axis=2), xp.flip(v, axis=2), **kw)


def _scale_off(q: Any, k: Any, v: Any, **kw: Any) -> Any:
    if "k_scale" in kw:
        kw["k_scale"] = kw["k_scale"] * 1.01
    return mha_cupy.scaled_dot_product_attention(q, k, v, **kw)


def _last_key_dropped(q: Any, k: Any, v: Any, **kw: Any) -> Any:
    return mha_cupy.scaled_dot_product_attention(q, k[:, :-1], v[:, :-1], **kw)


def _noisy(q: Any, k: Any, v: Any, **kw: Any) -> Any:
    return mha_cupy.scaled_dot_product_attention(q, k, v, **kw) * (1 + 1e-4)


BROKEN = {"reversed kv heads": (_reverse_kv_heads, "dense"), "k_scale 1% off": (_scale_off, "int8"),
          "last key dropped": (_last_key_dropped, "int8"), "output 1e-4 off": (_noisy, "dense")}


@pytest.mark.parametrize("breakage", BROKEN)
def test_checks_catch_a_broken_backend(breakage, monkeypatch):
    """The equality checks above fail when the backend is broken in any of these ways."""
    broken, kv = BROKEN[breakage]
    monkeypatch.setattr(mha_cupy.tabpfn, "scaled_dot_product_attention", broken)
    assert problems("v3", kv, monkeypatch) != []


def test_checks_catch_declined_calls(monkeypatch):
    monkeypatch.setattr(TabPFNAttentionBackend, "is_preferred", lambda self, spec: spec.seq_len_q != N_TEST)
    assert any(p.startswith("calls not ours") for p in problems("v3", "dense", monkeypatch))


@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_quantized_entries_reach_us_as_stored(kv, monkeypatch, registered):
    """TabPFN hands the cache entries over undequantized, and nothing dequantizes a whole entry."""
    model = random_model("v3")
    spy = Spy()
    monkeypatch.setattr(TabPFNAttentionBackend, "run", spy.wrap(TabPFNAttentionBackend.run))
    registered(policy="all")
    run_model(model, KV_DTYPES[kv])
    quantized = [r for r in spy.records if r.quantized_dtype is not None]
    assert len(quantized) == model.config.nlayers  # one per ICL layer of the cached predict
    assert all(r.quantized_dtype == KV_DTYPES[kv] and not r.dense_kv_given for r in quantized)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a whole quantized entry was dequantized")

    monkeypatch.undo()  # the spy's reference path dequantizes: without it, nothing may
    monkeypatch.setattr(QuantizedKVCacheEntry, "dequantize", refuse)
    assert sum(c is not None for c in run_model(model, KV_DTYPES[kv]).calls) > model.config.nlayers


@pytest.mark.parametrize("kv", ["int8", "fp8", "dense"])
def test_auto_leaves_small_calls_to_tabpfn(kv, registered):
    """Every call of the small model has fewer than ``AUTO_MIN_KEYS`` keys: auto takes none of them."""
    registered(policy="auto")
    assert all(c is None for c in run_model(random_model("v3"), KV_DTYPES[kv]).calls)


@pytest.mark.parametrize("kv", ["int8", "fp8", "dense"])
def test_auto_takes_what_its_rule_says(kv, monkeypatch, registered):
    """With the key threshold lowered under the small model's 600 training rows: every quantized call, and the
    dense calls of few query rows with wide heads (the decoder's), equal to TabPFN's own path."""
    monkeypatch.setattr(mha_cupy.tabpfn, "AUTO_MIN_KEYS", 500)
    model = random_model("v3")
    reference = run_model(model, KV_DTYPES[kv])
    spy = Spy()
    monkeypatch.setattr(TabPFNAttentionBackend, "run", spy.wrap(TabPFNAttentionBackend.run))
    registered(policy="auto")
    ours = run_model(model, KV_DTYPES[kv])
    assert sum(c is not None for c in ours.calls) == len(spy.records) > 0
    quantized = [r for r in spy.records if r.quantized_dtype is not None]
    assert len(quantized) == (0 if kv == "dense" else model.config.nlayers)
    dense = [r for r in spy.records if r.quantized_dtype is None]
    assert dense and all(r.q_shape[0] * r.q_shape[1] <= 1024 and r.q_shape[3] >= 32 for r in dense)
    assert all(r.error <= TOL for r in spy.records)
    assert scaled_error(ours.cached, reference.cached) <= TOL


def test_register_again_and_unregister(registered):
    first = registered()
    assert registered() is first
    assert mha_cupy.tabpfn.registered() is first
    assert attention_backends.registered_attention_backends()[0] is first  # consulted first
    second = registered(policy="all", memory_budget="64MiB")
    assert second is not first and mha_cupy.tabpfn.registered() is second
    assert sum(b.name == "mha_cupy" for b in attention_backends.registered_attention_backends()) == 1
    mha_cupy.tabpfn.unregister()
    mha_cupy.tabpfn.unregister()  # harmless
    assert mha_cupy.tabpfn.registered() is None


@pytest.mark.parametrize(("options", "error", "words"), [
    ({"policy": "fast"}, ValueError, "policy must be one of"),
    ({"batch_invariant": 1}, TypeError, "batch_invariant must be a bool"),
    ({"memory_budget": "lots"}, ValueError, "memory_budget"),
])
def test_bad_options_change_nothing(options, error, words, registered):
    first = registered()
    with pytest.raises(error, match=words):
        registered(**options)
    assert mha_cupy.tabpfn.registered() is first


def _spec(**changes: Any) -> AttentionSpec:
    fields = {"seq_len_q": 64, "seq_len_kv": 20_000, "num_heads": 8, "num_kv_heads": 8, "head_dim": 64,
              "dtype": torch.float32, "device": torch.device("cpu"), "batch_size": 1,
              "quantized_kv_dtype": torch.int8, "is_grad_enabled": False}
    return AttentionSpec(**{**fields, **changes})


@pytest.mark.parametrize("policy", ["auto", "all"])
@pytest.mark.parametrize("changes", [
    {"device": torch.device("cuda", 0)}, {"device": torch.device("meta")}, {"dtype": torch.int32},
    {"quantized_kv_dtype": torch.float8_e5m2}, {"quantized_kv_dtype": torch.uint8}, {"is_grad_enabled": True},
    {"seq_len_kv": None},
])
def test_declines_what_it_cannot_do(policy, changes):
    backend = TabPFNAttentionBackend(policy=policy)
    assert backend.is_preferred(_spec())
    assert not backend.is_preferred(_spec(**changes))


@pytest.mark.parametrize(("changes", "auto", "all_"), [
    ({"quantized_kv_dtype": None}, True, True),  # few queries over many keys
    ({"quantized_kv_dtype": None, "seq_len_q": 256}, True, True),
    ({"quantized_kv_dtype": None, "seq_len_q": 257}, False, True),  # no grouped heads: 256 rows at most
    ({"quantized_kv_dtype": None, "seq_len_q": 1024, "num_kv_heads": 1}, True, True),
    ({"quantized_kv_dtype": None, "seq_len_q": 1025, "num_kv_heads": 1}, False, True),
    ({"quantized_kv_dtype": None, "batch_size": 5}, False, True),
    ({"quantized_kv_dtype": None, "seq_len_kv": 8191}, False, True),
    ({"seq_len_kv": 8191}, False, True),
    ({"quantized_kv_dtype": None, "head_dim": 16}, False, True),
    ({"quantized_kv_dtype": None, "dtype": torch.float64}, False, True),
    ({"quantized_kv_dtype": None, "dtype": torch.float16, "num_kv_heads": 1}, False, True),
    ({"quantized_kv_dtype": None, "dtype": torch.bfloat16, "num_kv_heads": 1}, True, True),
    ({"quantized_kv_dtype": None, "dtype": torch.bfloat16}, False, True),  # bfloat16 without grouped heads
    ({"quantized_kv_dtype": None, "is_grad_enabled": True}, False, True),
    ({"seq_len_q": 100_000}, True, True),
    ({"quantized_kv_dtype": torch.float8_e4m3fn}, True, True),
    ({"dtype": torch.bfloat16}, True, True),
    ({"dtype": torch.bfloat16, "seq_len_q": 4096}, True, True),  # quantized: any number of rows
    ({"dtype": torch.float16, "seq_len_q": 128, "batch_size": 3}, True, True),
])
def test_policies(changes, auto, all_):
    assert TabPFNAttentionBackend(policy="auto").is_preferred(_spec(**changes)) is auto
    assert TabPFNAttentionBackend(policy="all").is_preferred(_spec(**changes)) is all_


def test_gradients_through_our_calls_equal_tabpfn():
    """Under grad mode ``policy="all"`` takes dense calls and serves them with mha_cupy's autograd node."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 40, 8, 16, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    k2, v2 = (a[:, :, :2].detach().requires_grad_() for a in (k, v))
    d_out = torch.randn(2, 40, 8, 16, generator=gen, dtype=torch.float64)
    backend = TabPFNAttentionBackend(policy="all")
    grads = []
    for run in (backend.run, lambda q, k, v: attention_backends_sdpa(q, k, v)):
        for a in (q, k2, v2):
            a.grad = None
        (run(q, k2, v2) * d_out).sum().backward()
        grads.append([a.grad.clone() for a in (q, k2, v2)])
    for ours, theirs in zip(*grads):
        assert scaled_error(ours, theirs) <= 1e-10


def attention_backends_sdpa(q: Any, k: Any, v: Any) -> Any:
    from tabpfn.architectures.shared.scaled_dot_product_attention import scaled_dot_product_attention
    return scaled_dot_product_attention(q, k, v, backend=None)


def test_batch_invariant_calls_are_bitwise_per_row():
    """With ``batch_invariant=True`` a test row's attention output is bitwise the same predicted alone or among
    others (over an int8 cache with per-batch-element scales)."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 100, 8, 16, generator=gen)
    entry = QuantizedKVCacheEntry(key=torch.randint(-127, 128, (2, 3000, 2, 16), dtype=torch.int8, generator=gen),
                                  value=torch.randint(-127, 128, (2, 3000, 2, 16), dtype=torch.int8, generator=gen),
                                  key_scale=torch.tensor([0.01, 0.02]).reshape(2, 1, 1, 1),
                                  value_scale=torch.tensor([0.03, 0.01]).reshape(2, 1, 1, 1))
    backend = TabPFNAttentionBackend(policy="all", batch_invariant=True)
    among = backend.run(q, None, None, quantized_kv=entry)
    for rows in (slice(7, 8), slice(0, 33), slice(5, 71)):
        alone = backend.run(q[:, rows], None, None, quantized_kv=entry)
        assert torch.equal(alone, among[:, rows])
    reference = attention_backends_sdpa(q, *(entry.dequantize(torch.float32).key, entry.dequantize(torch.float32).value))
    assert scaled_error(among, reference) <= TOL


def test_example_runs():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "tabpfn_backend.py"), "--quick"],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)})
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
