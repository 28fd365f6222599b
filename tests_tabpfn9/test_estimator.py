"""TabPFN's estimators as users run them, with and without ``mha_cupy.tabpfn.register(policy="all")``.

``TabPFNClassifier``/``TabPFNRegressor`` on a random-weight checkpoint (``checkpoints.py``; the small TabPFN-3.5
and TabPFN-3), ``device="cpu"``, 200 training and 30 test rows of 5 features, TabPFN's defaults otherwise (8
estimators, the loader's default inference config), over the fit modes, KV cache precisions and inference
precisions. Two checks:

- **each call** of ours equals float64 attention on the same inputs (a quantized entry dequantized in float64):
  1e-5 in float32; 2^-7 in bfloat16, two bfloat16 roundings (inputs are exact, the output is rounded once:
  measured at most 3.7e-3, TabPFN's own path 4.6e-3);
- **the predictions** (``predict_proba`` / ``predict``) equal TabPFN's own, as ``max |ours - theirs| / max(1, max
  |theirs|)``: 1e-5 in float32; 1e-4 in float32 over a quantized cache (a float32 rounding before the quantizer
  moves a key or value by one int8/float8 level; the TabPFN-3 regressor's mean carries that: 1.4e-5 (int8) and
  3.6e-5 (fp8) between us and TabPFN, and as much between TabPFN's own float32 and float64); 2^-6 under TabPFN's
  default ``inference_precision="auto"``, which is bfloat16 autocast on this CPU (TabPFN's rule,
  ``tabpfn.utils.infer_autocast_inference_mode``: oneDNN and AVX512-BF16 or AMX; float32 elsewhere): measured at
  most 1.1e-2 (the TabPFN-3 regressor; TabPFN's own bfloat16 is 2.4e-2 off its float64 there), 4e-3 for the rest.

And every call is ours: TabPFN's recorder saw only ours (it misses some calls: a layer records its training rows'
call into a recorder of its own), ``stats()`` counts no declined call, and the spy saw as many calls as were taken.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.datasets import make_classification, make_regression
from tabpfn import TabPFNClassifier, TabPFNRegressor
from tabpfn.architectures.shared.attention_backends import recorded_attention_backends
from tabpfn.utils import infer_autocast_inference_mode

import mha_cupy.tabpfn
from mha_cupy.tabpfn import TabPFNAttentionBackend

N_TRAIN, N_TEST, N_FEATURES = 200, 30, 5
#: Whether TabPFN's default inference_precision ("auto") runs bfloat16 autocast on this CPU.
AUTOCAST = infer_autocast_inference_mode([torch.device("cpu")], enable=None)
PRECISIONS = {"float32": torch.float32, "auto": "auto"}
#: Tolerances of the predictions and of each call, by precision ("float32 quantized": over an int8/fp8 cache).
TOLERANCES = {"float32": 1e-5, "float32 quantized": 1e-4, "bfloat16": 2.0**-6}
CALL_TOLERANCES = {"float32": 1e-5, "bfloat16": 2.0**-7}
#: (fit_mode, kv_cache_precision): kv_cache_precision only acts with "fit_with_cache" (None: TabPFN's default
#: there, int8; "auto": a dense cache in the computed dtype; "adaptive": int8 here, as mha_cupy declares no
#: kv_grid_dtype).
FITS = [("fit_preprocessors", None), *(("fit_with_cache", kv) for kv in (None, "auto", "int8", "fp8", "adaptive"))]
MODELS = [("v3.5", "classifier"), ("v3.5", "regressor"), ("v3", "classifier"), ("v3", "regressor")]


def data(task: str) -> tuple[np.ndarray, np.ndarray]:
    """``X [N_TRAIN + N_TEST, N_FEATURES]`` and ``y``: three classes, or a noisy linear target."""
    n = N_TRAIN + N_TEST
    if task == "classifier":
        return make_classification(n, N_FEATURES, n_informative=3, n_redundant=0, n_classes=3, random_state=0)
    return make_regression(n, N_FEATURES, n_informative=3, noise=5.0, random_state=0)


def attention_f64(q: torch.Tensor, k: Any, v: Any, quantized_kv: Any = None) -> torch.Tensor:
    """Float64 attention of ``q [B, T, N, H]`` over ``k``/``v [B, S, K, H]`` (or ``quantized_kv``'s entries times
    their scales), query head n reading key head ``n // (N // K)``, scale 1/sqrt(H)."""
    if quantized_kv is not None:
        k = quantized_kv.key.double() * quantized_kv.key_scale.double()
        v = quantized_kv.value.double() * quantized_kv.value_scale.double()
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    weights = (torch.einsum("btnh,bsnh->bnts", q, k) / q.shape[-1] ** 0.5).softmax(-1)
    return torch.einsum("bnts,bsnh->btnh", weights, v)


def tensor_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |actual - reference| / max(1, max |reference|)``, inf for another shape or a NaN."""
    if actual.shape != reference.shape:
        return float("inf")
    error = float((actual.double() - reference).abs().max() / max(1.0, float(reference.abs().max())))
    return error if error == error else float("inf")


@contextlib.contextmanager
def spied_calls() -> Iterator[list[tuple[torch.dtype, float]]]:
    """Within: each call that ``TabPFNAttentionBackend.run`` serves is appended as (dtype, error of its output
    against ``attention_f64`` on the same inputs)."""
    run, calls = TabPFNAttentionBackend.run, []

    def spied(self: Any, q: Any, k: Any, v: Any, *, quantized_kv: Any = None, **kwargs: Any) -> Any:
        out = run(self, q, k, v, quantized_kv=quantized_kv, **kwargs)
        calls.append((q.dtype, tensor_error(out, attention_f64(q, k, v, quantized_kv))))
        return out
    TabPFNAttentionBackend.run = spied
    try:
        yield calls
    finally:
        TabPFNAttentionBackend.run = run


@dataclasses.dataclass(frozen=True)
class Prediction:
    values: np.ndarray  # predict_proba [N_TEST, classes] or predict [N_TEST]
    recorded: tuple[str | None, ...]  # the backend of each call TabPFN's recorder saw (None: its own path)
    stats: dict[str, Any] | None = None  # mha_cupy.tabpfn.stats() after the predict, when registered
    served: tuple[tuple[torch.dtype, float], ...] = ()  # the calls our run served: dtype, error against float64


def predict(path: Path, task: str, *, policy: str | None = None, **options: Any) -> Prediction:
    """Fit and predict with TabPFN's estimator for ``task`` on ``path`` (``options`` go to its constructor), with
    mha_cupy registered under ``policy`` (None: not registered)."""
    x, y = data(task)
    estimator = TabPFNClassifier if task == "classifier" else TabPFNRegressor
    if policy is not None:
        mha_cupy.tabpfn.register(policy=policy)
    try:
        with recorded_attention_backends() as calls, spied_calls() as served:
            fitted = estimator(model_path=path, device="cpu", random_state=0, **options).fit(x[:N_TRAIN], y[:N_TRAIN])
            values = fitted.predict_proba(x[N_TRAIN:]) if task == "classifier" else fitted.predict(x[N_TRAIN:])
        counts = mha_cupy.tabpfn.stats() if policy is not None else None
    finally:
        if policy is not None:
            mha_cupy.tabpfn.unregister()
    return Prediction(values, tuple(getattr(c, "name", None) for c in calls), counts, tuple(served))


def scaled_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """``tensor_error`` of two arrays."""
    return tensor_error(torch.from_numpy(np.asarray(actual, dtype=np.float64)),
                        torch.from_numpy(np.asarray(reference, dtype=np.float64)))


def problems(ours: Prediction, theirs: Prediction, tolerance: float) -> list[str]:
    """What is wrong with the registered run ``ours`` against TabPFN's own ``theirs``: predictions off by more
    than ``tolerance``, calls off float64 attention by more than their dtype's ``CALL_TOLERANCES``, recorded calls
    not ours, calls declined, or taken calls that our run did not serve."""
    found = []
    error = scaled_error(ours.values, theirs.values)
    if not error <= tolerance:
        found.append(f"predictions off by {error:.3g} (tolerance {tolerance:.3g})")
    for dtype, call_error in ours.served:
        if not call_error <= CALL_TOLERANCES[str(dtype).removeprefix("torch.")]:
            found.append(f"a {dtype} call off float64 attention by {call_error:.3g}")
            break
    if not ours.recorded or any(name != mha_cupy.tabpfn.BACKEND_NAME for name in ours.recorded):
        found.append(f"recorded calls not ours: {ours.recorded}")
    if ours.stats is None or ours.stats["declined"] or ours.stats["taken"] != len(ours.served):
        found.append(f"calls declined or not served: {ours.stats}, {len(ours.served)} served")
    return found


def compare(path: Path, task: str, precision: str, **options: Any) -> list[str]:
    """``problems`` of ``policy="all"`` against TabPFN's own path at inference ``precision`` ("float32" or
    "auto")."""
    options["inference_precision"] = PRECISIONS[precision]
    theirs = predict(path, task, **options)
    ours = predict(path, task, policy="all", **options)
    quantized = options.get("fit_mode") == "fit_with_cache" and options.get("kv_cache_precision") != "auto"
    tolerance = TOLERANCES["bfloat16" if precision == "auto" and AUTOCAST else
                           "float32 quantized" if quantized else "float32"]
    return problems(ours, theirs, tolerance)


def fit_options(fit_mode: str, kv: str | None) -> dict[str, Any]:
    return {"fit_mode": fit_mode} if kv is None else {"fit_mode": fit_mode, "kv_cache_precision": kv}


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize(("fit_mode", "kv"), FITS)
@pytest.mark.parametrize(("kind", "task"), MODELS)
def test_predictions_equal_tabpfn_and_every_call_ours(kind, task, fit_mode, kv, precision, checkpoint):
    path = checkpoint(kind, None if kind == "v3.5" else task)
    assert compare(path, task, precision, **fit_options(fit_mode, kv)) == []


def test_default_precision_is_bfloat16_where_tabpfn_says_so(checkpoint):
    """The tolerance of "auto" follows TabPFN's own rule (on CPUs with AVX512-BF16 it picks bfloat16), and the
    calls then reach us in bfloat16."""
    has_bf16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    assert (has_bf16 and torch.backends.mkldnn.is_available()) == AUTOCAST
    served = predict(checkpoint("v3.5"), "classifier", policy="all", fit_mode="fit_with_cache").served
    assert {dtype for dtype, _ in served} == {torch.bfloat16 if AUTOCAST else torch.float32}


def test_bfloat16_calls_run_with_autocast_off():
    """Under TabPFN's bfloat16 autocast our torch adapter's float32 products must stay float32: logits near 200
    rounded to bfloat16 moved a TabPFN-3 call by 3.7e-2 before ``run`` switched autocast off. (Calls that need
    gradients take the torch adapter.)"""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(4, 64, 4, 4, generator=gen) * 8 for _ in range(3))
    q, k, v = q.bfloat16().requires_grad_(), k.bfloat16(), v.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = TabPFNAttentionBackend(policy="all").run(q, k, v).detach()
    assert out.dtype == torch.bfloat16
    assert tensor_error(out, attention_f64(q, k, v)) <= CALL_TOLERANCES["bfloat16"]


def test_bfloat16_cpu_calls_run_on_numpy(monkeypatch):
    """TabPFN's bfloat16 calls (its default on CPUs with AVX512-BF16) take the NumPy adapter, widened to float32,
    not the torch adapter (1.2x TabPFN's time on 1024 test rows over an int8 cache, where NumPy's is 0.8)."""
    def no_torch(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a bfloat16 CPU call took the torch adapter")
    monkeypatch.setattr(mha_cupy.tabpfn, "_on_torch", no_torch)
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 40, 4, 16, generator=gen).bfloat16() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = TabPFNAttentionBackend(policy="all").run(q, k[:, :, :2], v[:, :, :2])
    assert out.dtype == torch.bfloat16
    assert tensor_error(out, attention_f64(q, k[:, :, :2], v[:, :, :2])) <= CALL_TOLERANCES["bfloat16"]


def _off_by(delta: float) -> Callable[..., Any]:
    run = TabPFNAttentionBackend.run

    def broken(self: Any, *args: Any, **kwargs: Any) -> Any:
        return run(self, *args, **kwargs) + delta
    return broken


def _declining_every_other() -> Callable[..., Any]:
    reason, turn = TabPFNAttentionBackend.decline_reason, itertools.count()

    def broken(self: Any, spec: Any) -> str | None:
        return reason(self, spec) or ("broken" if next(turn) % 2 else None)
    return broken


#: Breakages: the method replaced, its replacement, and what ``problems`` must report.
BROKEN = {"output 1e-3 off": ("run", lambda: _off_by(1e-3), ("predictions off by", "call off float64 attention")),
          "every other call declined": ("decline_reason", _declining_every_other,
                                        ("recorded calls not ours", "calls declined"))}


@pytest.mark.parametrize("breakage", BROKEN)
@pytest.mark.parametrize(("fit_mode", "kv"), [("fit_preprocessors", None), ("fit_with_cache", "int8")])
def test_checks_catch_a_broken_backend(breakage, fit_mode, kv, checkpoint, monkeypatch):
    """The checks above fail when the backend is broken (in float32: 1e-3 is below bfloat16's resolution). The
    1e-3 offset moves the predictions by 2.4e-4 (fit_preprocessors) and 1.9e-4 (int8 cache)."""
    name, make, reported = BROKEN[breakage]
    monkeypatch.setattr(TabPFNAttentionBackend, name, make())
    found = " | ".join(compare(checkpoint("v3.5"), "classifier", "float32", **fit_options(fit_mode, kv)))
    assert all(words in found for words in reported), found
