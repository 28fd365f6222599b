"""TabPFN-3.5 under ``enable_torch_compile=True``: its attention and MLP blocks run as ``torch.compile(dynamic=True)``
regions, where TabPFN asks the registry while Dynamo traces and calls the chosen backend's ``run`` in the traced
code. Ours is then the operator ``torch.ops.mha_cupy.tabpfn_attention`` (``mha_cupy.tabpfn.OP_NAME``).

Checked: the compiled predict with ``register(policy="all")`` equals TabPFN's own compiled predict (float32:
1e-5), no call is declined, and as many calls are taken as in the same predict without compilation (each
compiled call counts as it runs). Broken on purpose (the backend declining whatever Dynamo traces, as it did
before the operator existed), the count falls short and the test says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tabpfn import TabPFNClassifier
from test_estimator import N_TRAIN, data, scaled_error

import mha_cupy.tabpfn
from mha_cupy.tabpfn import TabPFNAttentionBackend


def predict(path: Path, *, compile: bool, policy: str | None) -> tuple[np.ndarray, dict[str, Any] | None]:
    """``predict_proba`` of a float32 TabPFNClassifier on ``path`` (fit_preprocessors, TabPFN's default), with
    ``enable_torch_compile=compile`` and mha_cupy registered under ``policy`` (None: not registered); and
    ``stats()`` after the predict."""
    x, y = data("classifier")
    if policy is not None:
        mha_cupy.tabpfn.register(policy=policy)
    try:
        estimator = TabPFNClassifier(model_path=path, device="cpu", random_state=0, n_estimators=2,
                                     inference_precision=torch.float32, enable_torch_compile=compile)
        estimator.fit(x[:N_TRAIN], y[:N_TRAIN])
        mha_cupy.tabpfn.reset_stats()
        values = estimator.predict_proba(x[N_TRAIN:])
        return values, (mha_cupy.tabpfn.stats() if policy is not None else None)
    finally:
        if policy is not None:
            mha_cupy.tabpfn.unregister()


def compiled_problems(path: Path) -> list[str]:
    """What is wrong with the compiled, registered predict against TabPFN's compiled one and the eager count."""
    theirs, _ = predict(path, compile=True, policy=None)
    ours, counts = predict(path, compile=True, policy="all")
    _, eager = predict(path, compile=False, policy="all")
    found = []
    error = scaled_error(ours, theirs)
    if not error <= 1e-5:
        found.append(f"predictions off by {error:.3g}")
    if counts["declined"]:
        found.append(f"calls declined: {counts['declined']}")
    if counts["taken"] != eager["taken"]:
        found.append(f"{counts['taken']} calls taken compiled, {eager['taken']} eager")
    return found


def test_compiled_tabpfn_3_5_runs_on_us(checkpoint):
    assert compiled_problems(checkpoint("v3.5")) == []


def test_the_check_fails_when_compiled_calls_are_declined(checkpoint, monkeypatch):
    reason = TabPFNAttentionBackend.decline_reason

    def declines_traced(self: Any, spec: Any) -> str | None:
        return "traced" if torch.compiler.is_compiling() else reason(self, spec)
    monkeypatch.setattr(TabPFNAttentionBackend, "decline_reason", declines_traced)
    torch._dynamo.reset()  # no graph compiled with the working backend may be reused
    found = " | ".join(compiled_problems(checkpoint("v3.5")))
    assert "calls taken compiled" in found, found


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch (the graphs hold the backend chosen while tracing)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
