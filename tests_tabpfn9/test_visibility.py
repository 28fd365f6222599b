"""What the backend took and why it declined the rest: ``mha_cupy.tabpfn.stats()``, ``reset_stats()``,
``TabPFNAttentionBackend.decline_reason``, and the one warning of ``register()`` when a TabPFN predict ran
without a call taken."""

from __future__ import annotations

import threading
import warnings
from typing import Any

import pytest
import torch
from tabpfn import TabPFNClassifier
from tabpfn.architectures.shared.attention_backends import AttentionSpec
from test_estimator import N_TRAIN, data

import mha_cupy.tabpfn
from mha_cupy.tabpfn import TabPFNAttentionBackend

NOTHING_TAKEN = "ran without mha_cupy taking any attention call"


def _spec(**changes: Any) -> AttentionSpec:
    fields = {"seq_len_q": 64, "seq_len_kv": 20_000, "num_heads": 8, "num_kv_heads": 8, "head_dim": 64,
              "dtype": torch.float32, "device": torch.device("cpu"), "batch_size": 1,
              "quantized_kv_dtype": torch.int8, "is_grad_enabled": False}
    return AttentionSpec(**{**fields, **changes})


@pytest.mark.parametrize(("policy", "changes", "reason"), [
    ("auto", {}, None),
    ("auto", {"device": torch.device("cuda", 0)}, "on CUDA while CUDA_ENABLED is off"),
    ("all", {"device": torch.device("meta")}, "not on the CPU or CUDA"),
    ("all", {"dtype": torch.int32}, "dtype not float32, float64, float16 or bfloat16"),
    ("all", {"seq_len_kv": None}, "no key length"),
    ("all", {"quantized_kv_dtype": torch.float8_e5m2}, "quantized dtype not int8 or float8_e4m3fn"),
    ("all", {"is_grad_enabled": True}, "quantized cache in grad mode"),
    ("auto", {"quantized_kv_dtype": None, "is_grad_enabled": True}, "grad mode under policy 'auto'"),
    ("auto", {"seq_len_kv": 8191}, "fewer than 8192 keys (training rows)"),
    ("auto", {"quantized_kv_dtype": None, "dtype": torch.float16}, "dense and not float32 or bfloat16 under policy 'auto'"),
    ("auto", {"quantized_kv_dtype": None, "dtype": torch.bfloat16}, "dense bfloat16 without grouped heads under policy 'auto'"),
    ("auto", {"quantized_kv_dtype": None, "seq_len_q": 257},
     "dense without grouped heads with over 256 query rows under policy 'auto'"),
    ("auto", {"quantized_kv_dtype": None, "head_dim": 16}, "dense with heads under 32 under policy 'auto'"),
    ("auto", {"quantized_kv_dtype": None, "seq_len_q": 1025}, "dense with over 1024 query rows under policy 'auto'"),
    ("all", {"quantized_kv_dtype": None, "seq_len_q": 1025, "dtype": torch.bfloat16}, None),
])
def test_decline_reasons(policy, changes, reason):
    backend = TabPFNAttentionBackend(policy=policy)
    assert backend.decline_reason(_spec(**changes)) == reason
    assert backend.is_preferred(_spec(**changes)) is (reason is None)
    assert backend.counts.snapshot() == ({"taken": 1, "declined": {}} if reason is None else
                                         {"taken": 0, "declined": {reason: 1}})


def test_cuda_reasons(monkeypatch):
    monkeypatch.setattr(mha_cupy.tabpfn, "CUDA_ENABLED", True)
    cuda = torch.device("cuda", 0)
    assert TabPFNAttentionBackend(policy="auto").decline_reason(_spec(device=cuda)) == "on CUDA under policy 'auto'"
    assert TabPFNAttentionBackend(policy="all").decline_reason(
        _spec(device=cuda, quantized_kv_dtype=None, is_grad_enabled=True)) == "on CUDA in grad mode"
    assert TabPFNAttentionBackend(policy="all").decline_reason(_spec(device=cuda)) is None


def test_counts_are_thread_safe():
    backend = TabPFNAttentionBackend(policy="auto")
    specs = [_spec(), _spec(seq_len_kv=10)]

    def offer() -> None:
        for i in range(2000):
            backend.is_preferred(specs[i % 2])

    threads = [threading.Thread(target=offer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert backend.counts.snapshot() == {"taken": 8000, "declined": {"fewer than 8192 keys (training rows)": 8000}}


def _fit_predict(path: Any, **options: Any) -> TabPFNClassifier:
    x, y = data("classifier")
    clf = TabPFNClassifier(model_path=path, device="cpu", **options).fit(x[:N_TRAIN], y[:N_TRAIN])
    clf.predict_proba(x[N_TRAIN:])
    return clf


def test_stats_count_a_predict_and_reset(checkpoint, registered):
    registered(policy="all")
    mha_cupy.tabpfn.reset_stats()
    assert mha_cupy.tabpfn.stats() == {"taken": 0, "declined": {}}
    _fit_predict(checkpoint("v3.5"))
    taken = mha_cupy.tabpfn.stats()
    assert taken["taken"] > 0 and taken["declined"] == {}
    registered(policy="all")  # the same options: the same registration, the counts go on
    assert mha_cupy.tabpfn.stats() == taken
    mha_cupy.tabpfn.unregister()
    assert mha_cupy.tabpfn.stats() == taken  # kept after unregister
    registered(policy="auto")  # a new registration starts at zero
    assert mha_cupy.tabpfn.stats() == {"taken": 0, "declined": {}}


def test_small_data_warns_once_naming_reasons_and_policy_all(checkpoint, registered):
    """200 training rows are far below ``AUTO_MIN_KEYS``: auto takes nothing, says why, once."""
    registered(policy="auto")
    with pytest.warns(UserWarning, match=NOTHING_TAKEN) as caught:
        clf = _fit_predict(checkpoint("v3.5"), fit_mode="fit_with_cache")
    ours = [w for w in caught if NOTHING_TAKEN in str(w.message)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert "fewer than 8192 keys (training rows): " in message and "policy='all'" in message
    counts = mha_cupy.tabpfn.stats()
    assert counts["taken"] == 0 and counts["declined"]["fewer than 8192 keys (training rows)"] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, and the hook is gone
        clf.predict_proba(data("classifier")[0][N_TRAIN:])
    assert mha_cupy.tabpfn._watch is None


def test_no_warning_when_calls_are_taken(checkpoint, registered):
    registered(policy="all")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=f".*{NOTHING_TAKEN}")
        _fit_predict(checkpoint("v3", "classifier"), fit_mode="fit_preprocessors")
    assert mha_cupy.tabpfn._watch is None


def test_a_cache_fit_is_not_a_predict(checkpoint, registered, monkeypatch):
    """With fit_with_cache the fit's forward pass (building the cache: training rows over themselves, dense, 4 x 200
    query rows, more than auto takes dense here) takes nothing under auto; only the predict, over the int8 cache,
    shows whether auto takes anything."""
    monkeypatch.setattr(mha_cupy.tabpfn, "AUTO_MIN_KEYS", 100)
    monkeypatch.setattr(mha_cupy.tabpfn, "AUTO_MAX_QUERY_ROWS", 100)
    registered(policy="auto")
    x, y = data("classifier")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=f".*{NOTHING_TAKEN}")
        clf = TabPFNClassifier(model_path=checkpoint("v3.5"), device="cpu", fit_mode="fit_with_cache",
                               inference_precision=torch.bfloat16).fit(x[:N_TRAIN], y[:N_TRAIN])
        assert mha_cupy.tabpfn.stats()["taken"] == 0 and mha_cupy.tabpfn._watch is not None
        clf.predict_proba(x[N_TRAIN:])
    assert mha_cupy.tabpfn.stats()["taken"] > 0 and mha_cupy.tabpfn._watch is None


def test_unregister_removes_the_hook(registered):
    registered(policy="auto")
    assert mha_cupy.tabpfn._watch is not None
    mha_cupy.tabpfn.unregister()
    assert mha_cupy.tabpfn._watch is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.nn.Linear(2, 2)(torch.ones(1, 2))


def test_stats_before_any_register(monkeypatch):
    monkeypatch.setattr(mha_cupy.tabpfn, "_latest", None)
    assert mha_cupy.tabpfn.stats() == {"taken": 0, "declined": {}}
    mha_cupy.tabpfn.reset_stats()  # harmless
