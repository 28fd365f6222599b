"""``mha_cupy.tabpfn``'s CUDA path: off by default (``CUDA_ENABLED``), and when on, its two routes (``CUDA_ROUTE``:
CuPy through DLPack, or our torch adapter on the CUDA tensors).

On a CPU-only machine these tests check what can be checked there: which calls are taken, which route a call
takes, and the CuPy route's plumbing with NumPy standing in for CuPy (NumPy reads torch CPU tensors through the
same DLPack protocol). The tests marked ``needs a CUDA device`` run TabPFN-3 on the GPU against TabPFN's own path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from typing import Any

import numpy
import pytest
import torch
from conftest import KV_DTYPES, N_TRAIN, TOL, Spy, dataset, random_model, scaled_error
from tabpfn.architectures.interface import PerformanceOptions
from tabpfn.architectures.kv_cache import QuantizedKVCacheEntry
from tabpfn.architectures.shared import attention_backends
from tabpfn.architectures.shared.attention_backends import AttentionSpec
from tabpfn.architectures.shared.scaled_dot_product_attention import scaled_dot_product_attention as tabpfn_sdpa

import mha_cupy.tabpfn
from mha_cupy.tabpfn import TabPFNAttentionBackend

CUDA = torch.device("cuda", 0)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _spec(**changes: Any) -> AttentionSpec:
    fields = {"seq_len_q": 64, "seq_len_kv": 20_000, "num_heads": 8, "num_kv_heads": 8, "head_dim": 64,
              "dtype": torch.float32, "device": CUDA, "batch_size": 1, "quantized_kv_dtype": torch.int8,
              "is_grad_enabled": False}
    return AttentionSpec(**{**fields, **changes})


CUDA_CALLS = [{}, {"quantized_kv_dtype": torch.float8_e4m3fn}, {"quantized_kv_dtype": None},
              *({"quantized_kv_dtype": None, "dtype": dt} for dt in (torch.bfloat16, torch.float16, torch.float64)),
              {"quantized_kv_dtype": None, "seq_len_q": 20_000}]


def test_switch_is_off_and_routes_named():
    """Off until a GPU campaign run passed (benchmarks/gpu/tabpfn9_gpu.py); the route is one of the two."""
    assert mha_cupy.tabpfn.CUDA_ENABLED is False
    assert mha_cupy.tabpfn.CUDA_ROUTE in mha_cupy.tabpfn.CUDA_ROUTES == ("cupy", "torch")


@pytest.mark.parametrize("policy", ["auto", "all"])
@pytest.mark.parametrize("changes", CUDA_CALLS)
def test_cuda_calls_declined_while_off(policy, changes):
    assert not TabPFNAttentionBackend(policy=policy).is_preferred(_spec(**changes))


@pytest.mark.parametrize("changes", CUDA_CALLS)
def test_cuda_calls_taken_by_all_when_on(changes, monkeypatch):
    monkeypatch.setattr(mha_cupy.tabpfn, "CUDA_ENABLED", True)
    assert TabPFNAttentionBackend(policy="all").is_preferred(_spec(**changes))
    assert not TabPFNAttentionBackend(policy="auto").is_preferred(_spec(**changes))  # not measured on a GPU yet


@pytest.mark.parametrize("changes", [
    {"is_grad_enabled": True}, {"quantized_kv_dtype": None, "is_grad_enabled": True}, {"dtype": torch.int32},
    {"quantized_kv_dtype": torch.float8_e5m2}, {"seq_len_kv": None}, {"device": torch.device("meta")},
    {"device": torch.device("mps")},
])
def test_declined_when_on(changes, monkeypatch):
    monkeypatch.setattr(mha_cupy.tabpfn, "CUDA_ENABLED", True)
    assert not TabPFNAttentionBackend(policy="all").is_preferred(_spec(**changes))


@pytest.mark.parametrize("enabled", [False, True])
@pytest.mark.parametrize(("changes", "auto", "all_"), [
    ({}, True, True), ({"is_grad_enabled": True, "quantized_kv_dtype": None}, False, True),
    ({"seq_len_kv": 100}, False, True), ({"quantized_kv_dtype": None, "seq_len_q": 5000}, False, True),
])
def test_cpu_calls_unchanged_by_the_switch(enabled, changes, auto, all_, monkeypatch):
    monkeypatch.setattr(mha_cupy.tabpfn, "CUDA_ENABLED", enabled)
    spec = _spec(**changes, device=torch.device("cpu"))
    assert TabPFNAttentionBackend(policy="auto").is_preferred(spec) is auto
    assert TabPFNAttentionBackend(policy="all").is_preferred(spec) is all_


def _arrays(dtype: torch.dtype = torch.float32, kv_dtype: torch.dtype | None = None, *, grad: bool = False,
            scale_dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, Any]:
    """q [2, 50, 8, 16] over 300 keys of 2 heads (grouped), dense or quantized with per-batch scales."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 50, 8, 16, generator=gen).to(dtype).requires_grad_(grad)
    if kv_dtype is None:
        k, v = (torch.randn(2, 300, 2, 16, generator=gen).to(dtype) for _ in range(2))
        return {"q": q, "k": k, "v": v}
    k, v = (torch.randint(-127, 128, (2, 300, 2, 16), dtype=torch.int8, generator=gen) for _ in range(2))
    if kv_dtype != torch.int8:
        k, v = (a.to(torch.float32).div(4).to(kv_dtype) for a in (k, v))
    scales = (torch.tensor([0.01, 0.02]), torch.tensor([0.03, 0.01]))
    return {"q": q, "k": k, "v": v, **{n: s.reshape(2, 1, 1, 1).to(scale_dtype) for n, s in
                                       zip(("k_scale", "v_scale"), scales)}}


@pytest.mark.parametrize(("arrays", "route"), [
    ({}, "cupy"), ({"dtype": torch.float16}, "cupy"), ({"dtype": torch.float64}, "cupy"),
    ({"kv_dtype": torch.int8}, "cupy"), ({"dtype": torch.float16, "kv_dtype": torch.int8}, "cupy"),
    ({"dtype": torch.bfloat16}, "torch"), ({"kv_dtype": torch.float8_e4m3fn}, "torch"),
    ({"kv_dtype": torch.int8, "scale_dtype": torch.bfloat16}, "torch"), ({"grad": True}, "torch"),
], ids=["f32", "f16", "f64", "int8", "f16-int8", "bf16", "fp8", "bf16-scales", "grad"])
def test_route_of_a_call(arrays, route, monkeypatch):
    """``CUDA_ROUTE="cupy"`` sends a call to CuPy unless CuPy cannot hold one of its dtypes or it wants gradients;
    ``"torch"`` sends every call to the torch adapter, and so does the switch when off."""
    tensors = _arrays(**arrays)
    assert mha_cupy.tabpfn._cuda_route(tensors) == "torch"  # off
    monkeypatch.setattr(mha_cupy.tabpfn, "CUDA_ENABLED", True)
    assert mha_cupy.tabpfn._cuda_route(tensors) == "torch"  # the default route
    monkeypatch.setattr(mha_cupy.tabpfn, "CUDA_ROUTE", "cupy")
    assert mha_cupy.tabpfn._cuda_route(tensors) == route
    with torch.no_grad():
        assert mha_cupy.tabpfn._cuda_route(tensors) == ("cupy" if arrays == {"grad": True} else route)
    monkeypatch.setattr(mha_cupy.tabpfn, "CUDA_ROUTE", "torch")
    assert mha_cupy.tabpfn._cuda_route(tensors) == "torch"


@dataclasses.dataclass
class StandIn:
    """A module standing in for CuPy on the CPU: NumPy views through DLPack, devices and streams recorded."""

    modern: bool = True  # CuPy 14's Stream.from_external; CuPy 13's ExternalStream otherwise
    views: list[int] = dataclasses.field(default_factory=list)  # addresses of the arrays handed to the library
    entered: list[Any] = dataclasses.field(default_factory=list)

    def module(self) -> Any:
        def from_dlpack(t: torch.Tensor) -> numpy.ndarray:
            a = numpy.from_dlpack(t)
            self.views.append(a.__array_interface__["data"][0])
            return a

        def entering(what: Any) -> Any:
            self.entered.append(what)
            return contextlib.nullcontext()

        stream = types.SimpleNamespace()
        if self.modern:
            stream.from_external = lambda obj: entering(("stream", obj.__cuda_stream__()))
        cuda = types.SimpleNamespace(Device=lambda index: entering(("device", index)), Stream=stream,
                                     ExternalStream=lambda ptr, index: entering(("external", ptr, index)))
        return types.SimpleNamespace(from_dlpack=from_dlpack, cuda=cuda)


@pytest.mark.parametrize("modern", [True, False], ids=["cupy14", "cupy13"])
@pytest.mark.parametrize("kv_dtype", [None, torch.int8], ids=["dense", "int8"])
def test_cupy_route_plumbing(kv_dtype, modern, monkeypatch):
    """The CuPy route on the CPU with NumPy standing in: every input reaches the library as a view of the tensor's
    own memory (no copy), on the tensors' device and torch's current stream there, and the output equals TabPFN's
    own path and comes back as a tensor viewing the library's output."""
    stand_in = StandIn(modern=modern)
    monkeypatch.setattr(mha_cupy.tabpfn, "_cupy", stand_in.module)
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device: types.SimpleNamespace(cuda_stream=1234, device=device))
    returned = []
    original = mha_cupy.tabpfn.scaled_dot_product_attention

    def sdpa(**kw: Any) -> Any:
        returned.append(original(**kw))
        return returned[-1]

    monkeypatch.setattr(mha_cupy.tabpfn, "scaled_dot_product_attention", sdpa)
    arrays = _arrays(kv_dtype=kv_dtype)
    out = mha_cupy.tabpfn._on_cupy(arrays, batch_invariant=False, memory_budget=None)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (2, 50, 8, 16)
    assert out.data_ptr() == returned[0].__array_interface__["data"][0]  # torch.from_dlpack: a view
    assert stand_in.views == [t.data_ptr() for t in arrays.values()]  # the inputs' own memory
    stream = ("stream", (0, 1234)) if modern else ("external", 1234, None)
    assert stand_in.entered == [("device", None), stream]
    if kv_dtype is None:
        reference = tabpfn_sdpa(arrays["q"], arrays["k"], arrays["v"], backend=None)
    else:
        entry = QuantizedKVCacheEntry(key=arrays["k"], value=arrays["v"], key_scale=arrays["k_scale"],
                                      value_scale=arrays["v_scale"])
        reference = tabpfn_sdpa(arrays["q"], None, None, quantized_kv=entry, backend=None)
    assert scaled_error(out, reference) <= TOL


# -- on a GPU ------------------------------------------------------------------------------------------------------


def _cupy_or_skip(route: str) -> None:
    if route == "cupy":
        pytest.importorskip("cupy", reason="the cupy route needs CuPy")


def run_on_cuda(model: torch.nn.Module, kv_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor, list[Any]]:
    """``conftest.run_model`` on the GPU: a plain forward, and a predict from a cache fitted on the training rows."""
    x, y = (a.to(CUDA) for a in dataset(0))
    options = PerformanceOptions(kv_cache_dtype=kv_dtype)
    with torch.no_grad(), attention_backends.recorded_attention_backends() as calls:
        plain = model(x, y)
        _, cache = model(x[:N_TRAIN], y, return_kv_cache=True, performance_options=options)
        cached = model(x[N_TRAIN:], y, kv_cache=cache, x_is_test_only=True)
    return plain, cached, list(calls)


def _route_counter(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    counts = {"cupy": 0, "torch": 0}
    for route in counts:
        original = getattr(mha_cupy.tabpfn, f"_on_{route}")

        def counted(*args: Any, _route: str = route, _original: Any = original, **kw: Any) -> Any:
            counts[_route] += 1
            return _original(*args, **kw)

        monkeypatch.setattr(mha_cupy.tabpfn, f"_on_{route}", counted)
    return counts


@needs_cuda
@pytest.mark.parametrize("kv", ["int8", "fp8", "dense"])
@pytest.mark.parametrize("route", ["cupy", "torch"])
def test_gpu_every_call_ours_and_equal_to_tabpfn(route, kv, monkeypatch, registered):
    """TabPFN-3 with random weights on the GPU: every call ours, on the route asked for (float8 on torch's), each
    call and both outputs within 1e-5 (scaled) of TabPFN's own path."""
    _cupy_or_skip(route)
    model = random_model("v3").to(CUDA)
    reference = run_on_cuda(model, KV_DTYPES[kv])
    monkeypatch.setattr(mha_cupy.tabpfn, "CUDA_ENABLED", True)
    monkeypatch.setattr(mha_cupy.tabpfn, "CUDA_ROUTE", route)
    counts = _route_counter(monkeypatch)
    spy = Spy()
    monkeypatch.setattr(TabPFNAttentionBackend, "run", spy.wrap(TabPFNAttentionBackend.run))
    registered(policy="all")
    plain, cached, calls = run_on_cuda(model, KV_DTYPES[kv])
    assert len(calls) == len(reference[2]) and all(c is not None and c.name == "mha_cupy" for c in calls)
    # The spy counts every run; TabPFN's recorder saw one call per layer fewer (on an H200: 26 runs, 22 recorded, with
    # dense caches too). float8 entries take torch's route; the dense calls do not.
    must_torch = len(spy.records) if route == "torch" else sum(
        r.quantized_dtype == torch.float8_e4m3fn for r in spy.records)
    assert len(spy.records) >= len(calls)
    assert counts["torch"] == must_torch and sum(counts.values()) == len(spy.records), (counts, must_torch)
    assert plain.device == cached.device == CUDA
    assert all(r.error <= TOL for r in spy.records), [r.error for r in spy.records]
    assert scaled_error(plain, reference[0]) <= TOL
    assert scaled_error(cached, reference[1]) <= TOL


@needs_cuda
@pytest.mark.parametrize("route", ["cupy", "torch"])
def test_gpu_run_on_a_side_stream(route, monkeypatch):
    """A call made while torch works on a stream of its own equals TabPFN's path on the same inputs: q is written
    there after the stream sleeps (0.1 s of GPU time), so a computation on any other stream would read it unwritten;
    on the cupy route CuPy's current stream is torch's side stream throughout."""
    _cupy_or_skip(route)
    monkeypatch.setattr(mha_cupy.tabpfn, "CUDA_ENABLED", True)
    monkeypatch.setattr(mha_cupy.tabpfn, "CUDA_ROUTE", route)
    streams = []
    attend = mha_cupy.tabpfn.scaled_dot_product_attention

    def recorded(*args: Any, **kwargs: Any) -> Any:
        if route == "cupy":
            import cupy

            streams.append(cupy.cuda.get_current_stream().ptr)
        return attend(*args, **kwargs)

    monkeypatch.setattr(mha_cupy.tabpfn, "scaled_dot_product_attention", recorded)
    arrays = {n: t.to(CUDA) for n, t in _arrays(kv_dtype=torch.int8).items()}
    entry = QuantizedKVCacheEntry(key=arrays["k"], value=arrays["v"], key_scale=arrays["k_scale"],
                                  value_scale=arrays["v_scale"])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        torch.cuda._sleep(10**8)
        q = arrays["q"] * 1.0  # made on the side stream after the sleep, then attended there
        ours = TabPFNAttentionBackend(policy="all").run(q, None, None, quantized_kv=entry)
        theirs = tabpfn_sdpa(q, None, None, quantized_kv=entry, backend=None)
    torch.cuda.synchronize()
    assert scaled_error(ours, theirs) <= TOL
    assert streams == ([side.cuda_stream] if route == "cupy" else [])


def test_an_unknown_route_is_refused_with_the_routes(monkeypatch):
    monkeypatch.setattr(mha_cupy.tabpfn, "CUDA_ROUTE", "cuda")
    with pytest.raises(ValueError, match=r"CUDA_ROUTE must be one of \('cupy', 'torch'\), got 'cuda'"):
        mha_cupy.tabpfn._cuda_route(_arrays())
