"""Small TabPFN 9 models with random weights, and the checks the tests run on them.

Every check compares mha_cupy with TabPFN's own attention path run in the same
process on the same model, weights and inputs (tabpfn is the reference here),
with the project's tolerance: max abs error <= 1e-5 * max(1, max |reference|)
for float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tabpfn.architectures import tabpfn_v2_6, tabpfn_v3
from tabpfn.architectures.interface import PerformanceOptions
from tabpfn.architectures.shared import attention_backends
from tabpfn.architectures.shared.scaled_dot_product_attention import scaled_dot_product_attention as tabpfn_sdpa

import mha_cupy.tabpfn

TOL = 1e-5
N_TRAIN, N_TEST, N_FEATURES = 600, 50, 6
#: The model of the issue: TabPFN-3, 4 ICL layers, grouped heads (4 KV heads for training rows, 1 for test rows).
V3_CONFIG = {"max_num_classes": 10, "embed_dim": 32, "nlayers": 4, "dist_embed_num_blocks": 1,
             "feat_agg_num_blocks": 1, "icl_num_kv_heads": 4, "icl_num_kv_heads_test": 1}
V26_CONFIG = {"max_num_classes": 10, "emsize": 48, "nlayers": 2, "nhead": 3, "num_thinking_rows": 8}
KV_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "dense": None}


def random_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """A TabPFN-3 ("v3") or TabPFN-2.6 ("v2.6") with random weights, std 2 / sqrt(fan-in): attention sharp
    enough that a wrong head grouping moves the output by ~1e-2 (TabPFN's initialisation leaves some
    projections at zero, which would hide attention from the output altogether)."""
    torch.manual_seed(seed)
    module, config = (tabpfn_v3, tabpfn_v3.TabPFNV3Config(**V3_CONFIG)) if kind == "v3" else (
        tabpfn_v2_6, tabpfn_v2_6.TabPFNV2p6Config(**V26_CONFIG))
    model = module.get_architecture(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / max(1, p.shape[-1]) ** 0.5))
    return model


def dataset(seed: int = 0, n_train: int = N_TRAIN, n_test: int = N_TEST) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [n_train + n_test, 1, features]`` and ``y [n_train]`` (three classes)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, 1, N_FEATURES, generator=gen)
    return x, torch.randint(0, 3, (n_train,), generator=gen).float()


@dataclasses.dataclass
class Outputs:
    plain: torch.Tensor  # one forward over train and test rows
    cached: torch.Tensor  # fit with a cache, then predict the test rows from it
    calls: list[Any]  # the backend of every attention call (None: TabPFN's own path)


def run_model(model: torch.nn.Module, kv_dtype: torch.dtype | None, seed: int = 0) -> Outputs:
    x, y = dataset(seed)
    options = PerformanceOptions(kv_cache_dtype=kv_dtype)
    with torch.no_grad(), attention_backends.recorded_attention_backends() as calls:
        plain = model(x, y)
        _, cache = model(x[:N_TRAIN], y, return_kv_cache=True, performance_options=options)
        cached = model(x[N_TRAIN:], y, kv_cache=cache, x_is_test_only=True)
    return Outputs(plain, cached, list(calls))


def scaled_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    ref = reference.double()
    return float((actual.double() - ref).abs().max() / max(1.0, float(ref.abs().max())))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``checkpoint(kind, task=None)``: the path of a random-weight checkpoint (``checkpoints.write_checkpoint``,
    the small models), written once per session."""
    from checkpoints import checkpoint_name, write_checkpoint

    folder = tmp_path_factory.mktemp("checkpoints")
    written: dict[tuple[str, str | None], Path] = {}

    def path(kind: str = "v3.5", task: str | None = None) -> Path:
        if (kind, task) not in written:
            written[kind, task] = write_checkpoint(folder / checkpoint_name(kind, task), kind, task)
        return written[kind, task]
    return path


@pytest.fixture
def registered() -> Iterator[Callable[..., Any]]:
    """``register(**options)``, with mha_cupy unregistered again after the test."""
    yield mha_cupy.tabpfn.register
    mha_cupy.tabpfn.unregister()


@dataclasses.dataclass
class CallRecord:
    quantized_dtype: torch.dtype | None  # storage dtype of the entry as it reached us
    dense_kv_given: bool  # whether TabPFN also handed dense k/v
    error: float  # scaled error of our output against TabPFN's own path on the same inputs
    q_shape: tuple[int, ...]  # [B, T, N, H]


class Spy:
    """Wraps the registered backend's ``run``: each call also runs TabPFN's own path on the same inputs."""

    def __init__(self) -> None:
        self.records: list[CallRecord] = []

    def wrap(self, run: Callable[..., Any]) -> Callable[..., Any]:
        """``TabPFNAttentionBackend.run`` (the method, unbound) spied on."""
        def spied(backend: Any, q: Any, k: Any, v: Any, *, quantized_kv: Any = None, **kwargs: Any) -> Any:
            ours = run(backend, q, k, v, quantized_kv=quantized_kv, **kwargs)
            with attention_backends.recorded_attention_backends():  # not among the model's calls
                theirs = tabpfn_sdpa(q, k, v, quantized_kv=quantized_kv, backend=None)
            self.records.append(CallRecord(None if quantized_kv is None else quantized_kv.key.dtype,
                                           k is not None, scaled_error(ours, theirs), tuple(q.shape)))
            return ours
        return spied
