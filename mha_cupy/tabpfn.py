"""mha_cupy as an attention backend of TabPFN 9 (``tabpfn>=9``: the TabPFN-2.5, 2.6, 3 and 3.5 models).

Every attention call of those models goes through
``tabpfn.architectures.shared.scaled_dot_product_attention``, which asks
the registry of ``tabpfn.architectures.shared.attention_backends`` which
backend takes it. ``register()`` puts ours first in that registry;
``unregister()`` takes it out. Tensors are ``(B, S, H, D)``: ``[B, T, N, H]``
here, with TabPFN's grouped heads (query head n reads key head
``n // (N // K)``) folded into GEMM rows, never repeated.

Quantized KV caches (TabPFN 9's ``QuantizedKVCacheEntry``: int8 or
float8_e4m3fn, one scale per tensor or per batch element) reach us as stored
(``consumes_quantized_kv``) and are dequantized one key chunk at a time inside
the chunk loop, never as a dense copy of the whole cache.

Which calls we take (``is_preferred`` sees only the call's shapes):

- never: tensors on devices other than the CPU and CUDA, CUDA tensors while
  ``CUDA_ENABLED`` is False (the default: our CuPy and torch-CUDA paths have
  not passed a GPU run yet), dtypes other than float32/float64/float16/bfloat16,
  quantized dtypes other than int8/float8_e4m3fn, calls in grad mode while
  ``torch.compile`` traces, quantized calls with grad mode on (they take no
  gradients), CUDA calls with grad mode on;
- ``policy="all"``: every other call (determinism, ``batch_invariant``), those
  in grad mode (CPU only) through our autograd node;
- ``policy="auto"``: of those, only CPU calls outside grad mode where the
  benchmarks (``benchmarks/bench_tabpfn_calls.py`` per call,
  ``benchmarks/bench_tabpfn_estimator.py`` per predict) show us at least as
  fast or leaner: calls over at least ``AUTO_MIN_KEYS`` keys (TabPFN's keys
  are its training rows) that come from a quantized cache (no dense copy), or
  dense float32/bfloat16 ones of few query rows (TabPFN's test rows over its
  training rows): ``AUTO_RULE`` below.
  No CUDA call: on an H200 our CUDA routes were 2.2-2.9x TabPFN's time
  (``benchmarks/results/gpu-2026-12-04.md``).

CUDA calls (with ``CUDA_ENABLED``) run on the route ``CUDA_ROUTE`` names:
``"cupy"`` hands the tensors to CuPy through DLPack (no copy), runs CuPy on
torch's current stream, and hands the result back to torch the same way
(CuPy's temporaries come from CuPy's own memory pool, beside torch's caching
allocator); ``"torch"`` runs our torch adapter on the CUDA tensors
themselves. bfloat16 and float8_e4m3fn, which CuPy does not hold, take the
torch route on either. The memory budget is the adapters' per-device
default (a quarter of the device's free memory) unless ``register`` is
given one.

What was taken: ``stats()`` counts the calls offered since ``register``, taken
and declined by reason (``TabPFNAttentionBackend.decline_reason``);
``register`` warns once when a TabPFN predict ran without a call taken.

Importing this module imports neither torch nor tabpfn; ``register`` does.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

from ._backends import FLOAT_DTYPES, QUANTIZED_MAX
from ._budget import parse_memory_budget
from ._validation import check_bool, keyword_hints
from .attention import scaled_dot_product_attention

__all__ = ["POLICIES", "AUTO_RULE", "CUDA_ENABLED", "CUDA_ROUTE", "CUDA_ROUTES", "AUTO_MAX_QUERY_ROWS",
           "AUTO_MAX_UNGROUPED_ROWS", "AUTO_MIN_KEYS", "AUTO_MIN_HEAD_DIM", "BACKEND_NAME", "OP_NAME",
           "TabPFNAttentionBackend", "register", "registered", "reset_stats", "stats", "unregister"]

#: Whether CUDA calls are taken at all (``policy="all"`` only). Flipped only after a GPU campaign run passed
#: (``benchmarks/gpu/tabpfn9_gpu.py``; see ``benchmarks/results/gpu-*``); until then TabPFN runs CUDA calls itself.
#: Read at every call: the campaign sets ``mha_cupy.tabpfn.CUDA_ENABLED = True`` in its own process.
CUDA_ENABLED = False
#: The routes a CUDA call can take: CuPy arrays viewing the tensors through DLPack, or our torch adapter on them.
CUDA_ROUTES = ("cupy", "torch")
#: The route of CUDA calls (read at every call, as ``CUDA_ENABLED``); bfloat16 and float8 always go "torch". "torch"
#: by default: on an H200 the two routes predicted as fast (TabPFN-3.5 142 ms torch, 154 ms cupy; TabPFN-3 123 and
#: 122 ms; benchmarks/results/gpu-2026-12-04.md), and the torch route keeps every byte in torch's allocator, where
#: the cupy route held 0.26-1.2 GB more in CuPy's pool beside it.
CUDA_ROUTE = "torch"
#: The policies ``register`` takes.
POLICIES = ("auto", "all")
#: The name the backend is registered under.
BACKEND_NAME = "mha_cupy"
#: The torch operator ``run`` is inside regions ``torch.compile`` compiles (defined by ``register``).
OP_NAME = "mha_cupy::tabpfn_attention"
#: ``policy="auto"`` takes calls over many keys (TabPFN's training rows): quantized ones, and dense ones of few query
#: rows (batch × queries) with wide heads. Measured per call kind of TabPFN-3.5 in both of TabPFN's CPU precisions
#: (``benchmarks/bench_tabpfn_calls.py``; benchmarks/results/tabpfn-calls-native-2026-12-04T2059.md), ours against
#: TabPFN's path at 10,000 and 20,000 keys: quantized 0.01-0.82 (float32) and 0.05-1.03 (bfloat16); dense with
#: grouped heads (16 over 1) 0.02-0.85 and 0.37-0.95 up to 1024 rows; dense without (6 over 6, TabPFN's decoder)
#: 0.14-0.89 in float32 up to 256 rows but 1.08-1.17 at 1024, and 0.96-4.3 in bfloat16; the training rows over
#: themselves 1.08-1.20 and 0.97-1.03. Below ``AUTO_MIN_KEYS`` per-call overheads dominate.
AUTO_MIN_KEYS = 8192
#: Calls with more query rows (batch × queries) than this are left to TabPFN (where we measured no gain).
AUTO_MAX_QUERY_ROWS = 1024
#: Calls with narrower heads are left to TabPFN (per-call overheads dominate there).
AUTO_MIN_HEAD_DIM = 32
#: Dense calls without grouped heads (as many key heads as query heads) are taken in float32 up to this many rows.
AUTO_MAX_UNGROUPED_ROWS = 256
#: What ``policy="auto"`` takes, in words (the numbers are in ``docs/guide/tabpfn9.md`` and ``benchmarks/results``).
AUTO_RULE = (f"calls over at least {AUTO_MIN_KEYS} keys (training rows), outside grad mode, on the CPU: those "
             f"from a quantized (int8 or float8_e4m3fn) KV cache, and dense float32 or bfloat16 ones of at most "
             f"{AUTO_MAX_QUERY_ROWS} query rows with heads of {AUTO_MIN_HEAD_DIM} or more, grouped (fewer key heads "
             f"than query heads) or, in float32, of at most {AUTO_MAX_UNGROUPED_ROWS} query rows")
#: Dtypes CuPy holds (q, k, v, quantized k/v, scales): a call with any other (bfloat16, float8) takes the torch route.
_CUPY_DTYPES = ("float32", "float64", "float16", "int8")
_COMPILING = "grad mode while torch.compile traces"
_lock = threading.Lock()
#: The backend ``register`` made last (``stats`` reads its counts), and the forward hook waiting for the first
#: predicting forward pass after it (None once that pass ran, or after ``unregister``).
_latest: TabPFNAttentionBackend | None = None
_watch: Any = None


def _torch_dtypes(names: tuple[str, ...]) -> frozenset[Any]:
    """torch's dtypes by name (not cached: ``is_preferred`` runs while Dynamo traces, which ignores caches)."""
    import torch

    return frozenset(getattr(torch, n) for n in names)


@functools.cache
def _registry() -> Any:
    """TabPFN 9's backend registry, imported on first use.

    The installed tabpfn's version is read first (``importlib.metadata``, without importing it): a tabpfn
    before 9 (2.x has no registry) is an ImportError naming tabpfn 9 at once. Any error raised while importing
    tabpfn becomes that ImportError too, with the error chained: importing tabpfn imports scikit-learn, which can
    raise other errors (a RuntimeError about ``SCIPY_ARRAY_API`` when SciPy was imported without it).
    """
    try:
        version = importlib.metadata.version("tabpfn")
    except importlib.metadata.PackageNotFoundError:
        version = None  # not installed, or importable without metadata: the import decides
    major = re.match(r"\d+", version or "")
    if major is not None and int(major.group()) < 9:
        raise ImportError(_needs_tabpfn9(f"found tabpfn {version}"))
    try:
        from tabpfn.architectures.shared import attention_backends
    except Exception as exc:  # noqa: BLE001  ImportError, or whatever scikit-learn raises while being imported
        raise ImportError(_needs_tabpfn9(f"importing it failed: {type(exc).__name__}: {exc}")) from exc
    return attention_backends


def _needs_tabpfn9(found: str) -> str:
    return (f"mha_cupy.tabpfn needs tabpfn 9 with its attention-backend registry "
            f"(tabpfn.architectures.shared.attention_backends): pip install \"tabpfn>=9\" ({found})")


class _Counts:
    """Thread-safe counts of the calls a backend was offered: taken, and declined by reason."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.taken = 0
        self.declined: dict[str, int] = {}

    def add(self, reason: str | None) -> None:
        """Count one call: taken when ``reason`` is None, otherwise declined for ``reason``."""
        with self._lock:
            if reason is None:
                self.taken += 1
            else:
                self.declined[reason] = self.declined.get(reason, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """``{"taken": int, "declined": {reason: int}}``, most frequent reason first."""
        with self._lock:
            declined = dict(sorted(self.declined.items(), key=lambda item: -item[1]))
            return {"taken": self.taken, "declined": declined}

    def reset(self) -> None:
        with self._lock:
            self.taken = 0
            self.declined = {}


@dataclass(frozen=True, eq=False)
class TabPFNAttentionBackend:
    """TabPFN 9's ``AttentionBackend`` protocol, run by ``mha_cupy.scaled_dot_product_attention``.

    ``policy`` ("auto" or "all"), ``batch_invariant`` and ``memory_budget``
    (bytes, a string such as ``"256MB"``, or None for the per-device default)
    are those given to ``register``.
    """

    policy: str = "auto"
    batch_invariant: bool = False
    memory_budget: int | str | None = None
    #: Calls offered since this backend was made (or since ``reset_stats``), taken and declined by reason.
    counts: _Counts = field(default_factory=_Counts, init=False, repr=False, compare=False)
    name: ClassVar[str] = BACKEND_NAME
    #: TabPFN hands quantized cache entries over as stored, not dequantized.
    consumes_quantized_kv: ClassVar[bool] = True

    def is_preferred(self, spec: Any) -> bool:
        """Whether to take a call described by TabPFN's ``AttentionSpec`` (cheap: shapes and flags only); each
        answer is counted in ``counts`` (``stats()``)."""
        import torch

        reason = self.decline_reason(spec)
        if not torch.compiler.is_compiling():  # no lock in code Dynamo traces: compiled calls count as they run
            self.counts.add(reason)
        return reason is None

    def decline_reason(self, spec: Any) -> str | None:  # noqa: PLR0911  one return per rule
        """Why a call described by ``spec`` is declined (a short phrase, the key of ``stats()["declined"]``), or
        None when it is taken. Counts nothing."""
        import torch

        device = spec.device.type
        if device == "cuda" and not CUDA_ENABLED:
            return "on CUDA while CUDA_ENABLED is off"
        if device not in ("cpu", "cuda"):
            return "not on the CPU or CUDA"
        if spec.dtype not in _torch_dtypes(tuple(FLOAT_DTYPES)):
            return "dtype not float32, float64, float16 or bfloat16"
        if spec.seq_len_kv is None:
            return "no key length"
        quantized = spec.quantized_kv_dtype is not None
        if quantized and spec.quantized_kv_dtype not in _torch_dtypes(tuple(QUANTIZED_MAX)):
            return "quantized dtype not int8 or float8_e4m3fn"
        if spec.is_grad_enabled and torch.compiler.is_compiling():
            return _COMPILING
        if quantized and spec.is_grad_enabled:
            return "quantized cache in grad mode"
        if device == "cuda":  # no autograd across DLPack, and no GPU measurements for "auto" yet
            if self.policy != "all":
                return "on CUDA under policy 'auto'"
            return "on CUDA in grad mode" if spec.is_grad_enabled else None
        if self.policy == "all":
            return None
        return _auto_decline_reason(spec, quantized)

    def run(self, q_BSHD: Any, k_BSJD: Any, v_BSJD: Any, *, quantized_kv: Any = None, **kwargs: Any) -> Any:
        """Attention of ``q [B, T, N, H]`` over dense ``k``/``v [B, S, K, H]``, or over ``quantized_kv``'s keys and
        values with their scales (then ``k``/``v`` are None); returns ``[B, T, N, H]`` in q's dtype. While
        ``torch.compile`` traces, the call is the operator ``torch.ops.mha_cupy.tabpfn_attention`` (``OP_NAME``):
        Dynamo sees its output's shape and dtype, and the compiled graph runs the same attention."""
        del kwargs  # informational context TabPFN may add
        k, v, k_scale, v_scale = k_BSJD, v_BSJD, None, None
        if quantized_kv is not None:
            k, v = quantized_kv.key, quantized_kv.value
            k_scale, v_scale = quantized_kv.key_scale, quantized_kv.value_scale
        import torch

        if torch.compiler.is_compiling():
            budget = None if self.memory_budget is None else parse_memory_budget(self.memory_budget)
            return torch.ops.mha_cupy.tabpfn_attention(q_BSHD, k, v, k_scale, v_scale, self.batch_invariant, budget)
        return _attend(q_BSHD, k, v, k_scale, v_scale, batch_invariant=self.batch_invariant,
                       memory_budget=self.memory_budget)


def _attend(q: Any, k: Any, v: Any, k_scale: Any, v_scale: Any, **options: Any) -> Any:
    """``run``'s attention on the route its tensors take: CUDA (``_cuda_route``), NumPy's adapter for CPU tensors
    it can view (``_numpy_views``), else our torch adapter."""
    arrays = {"q": q, "k": k, "v": v}
    arrays.update({name: s for name, s in (("k_scale", k_scale), ("v_scale", v_scale)) if s is not None})
    if q.device.type == "cuda":
        return (_on_cupy if _cuda_route(arrays) == "cupy" else _on_torch)(arrays, **options)
    views = _numpy_views(arrays)
    if views is None:
        return _on_torch(arrays, **options)
    import torch

    from ._backends import TorchBackend, resolve_backend

    out = scaled_dot_product_attention(**views, **options)
    if q.dtype != torch.bfloat16:
        return torch.from_numpy(out)
    return cast(TorchBackend, resolve_backend("torch")).bfloat16_from_numpy(out)


@functools.cache
def _define_op() -> Any:
    """Define ``OP_NAME`` (once, on ``register``): ``_attend`` as a torch custom operator with a fake
    implementation (an empty ``[B, T, N, V]`` tensor in q's dtype and device), so that Dynamo traces a call of
    ours in a compiled region (TabPFN-3.5's ``enable_torch_compile``) as one opaque node instead of declining it.
    Calls it runs count as taken in ``stats()`` (they never reach ``is_preferred`` again). No autograd: the
    backend declines compiled calls in grad mode."""
    import torch

    schema = ("(Tensor q, Tensor k, Tensor v, Tensor? k_scale, Tensor? v_scale, bool batch_invariant, "
              "int? memory_budget) -> Tensor")

    @torch.library.custom_op(OP_NAME, mutates_args=(), schema=schema)
    def op(q: Any, k: Any, v: Any, k_scale: Any, v_scale: Any, batch_invariant: bool, memory_budget: Any) -> Any:
        backend = _latest
        if backend is not None:
            backend.counts.add(None)
        return _attend(q, k, v, k_scale, v_scale, batch_invariant=batch_invariant, memory_budget=memory_budget)

    @op.register_fake
    def _(q: Any, k: Any, v: Any, k_scale: Any, v_scale: Any, batch_invariant: bool, memory_budget: Any) -> Any:
        del k, k_scale, v_scale, batch_invariant, memory_budget
        return q.new_empty((*q.shape[:3], v.shape[3]))

    return op


def _auto_decline_reason(spec: Any, quantized: bool) -> str | None:  # noqa: PLR0911  one return per rule
    """Why ``policy="auto"`` declines a CPU call it could run (``AUTO_RULE``), or None when it takes it."""
    import torch

    if spec.is_grad_enabled:
        return "grad mode under policy 'auto'"
    if spec.seq_len_kv < AUTO_MIN_KEYS:
        return f"fewer than {AUTO_MIN_KEYS} keys (training rows)"
    if quantized:
        return None
    rows = (spec.batch_size or 1) * (spec.seq_len_q or 0)
    if spec.dtype not in _torch_dtypes(("float32", "bfloat16")):
        return "dense and not float32 or bfloat16 under policy 'auto'"
    if spec.head_dim < AUTO_MIN_HEAD_DIM:
        return f"dense with heads under {AUTO_MIN_HEAD_DIM} under policy 'auto'"
    if rows > AUTO_MAX_QUERY_ROWS:
        return f"dense with over {AUTO_MAX_QUERY_ROWS} query rows under policy 'auto'"
    if spec.num_kv_heads == spec.num_heads and spec.dtype != torch.float32:
        return "dense bfloat16 without grouped heads under policy 'auto'"
    if spec.num_kv_heads == spec.num_heads and rows > AUTO_MAX_UNGROUPED_ROWS:
        return f"dense without grouped heads with over {AUTO_MAX_UNGROUPED_ROWS} query rows under policy 'auto'"
    return None


def _cuda_route(arrays: dict[str, Any]) -> str:
    """The route of a call on CUDA tensors: ``CUDA_ROUTE``, except "torch" where CuPy cannot hold a dtype (bfloat16,
    float8), where gradients are wanted (DLPack carries none), and while ``CUDA_ENABLED`` is off (a direct ``run``
    on CUDA tensors then behaves as before the switch existed)."""
    import torch

    if CUDA_ROUTE not in CUDA_ROUTES:
        msg = f"mha_cupy.tabpfn.CUDA_ROUTE must be one of {CUDA_ROUTES}, got {CUDA_ROUTE!r}"
        raise ValueError(msg)
    if not CUDA_ENABLED or CUDA_ROUTE != "cupy":
        return "torch"
    tensors = [t for t in arrays.values() if isinstance(t, torch.Tensor)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "torch"
    if any(t.dtype not in _torch_dtypes(_CUPY_DTYPES) for t in tensors):
        return "torch"
    return "cupy"


def _on_torch(arrays: dict[str, Any], **options: Any) -> Any:
    """Attention by our torch adapter on the tensors themselves (any device; autograd where they need it), with
    torch's autocast off: under TabPFN's bfloat16 autocast (its default on CPUs with AVX512-BF16) torch would run
    the adapter's float32 products of bfloat16 inputs in bfloat16 again, rounding logits of magnitude ~200 by ~1
    (a TabPFN-3 call measured 3.7e-2 off float64 attention under autocast, 2.4e-3 without: bfloat16's output
    rounding)."""
    import torch

    with torch.autocast(arrays["q"].device.type, enabled=False):
        return scaled_dot_product_attention(**arrays, **options)


def _on_cupy(arrays: dict[str, Any], **options: Any) -> Any:
    """Attention by our CuPy adapter on CuPy arrays viewing the CUDA tensors (DLPack, no copy), on the tensors'
    device and on torch's current stream there (so torch's allocator, which frees and reuses the inputs in that
    stream's order, and CuPy never race); the result comes back as a torch tensor viewing CuPy's output. Scales on
    another device than q (none in TabPFN) are moved to it first: DLPack cannot cross devices."""
    import torch

    cupy = _cupy()
    device = arrays["q"].device

    def view(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):  # a scale given as a number
            return t
        return cupy.from_dlpack((t if t.device == device else t.to(device)).detach())

    with cupy.cuda.Device(device.index), _cupy_stream(cupy, torch.cuda.current_stream(device)):
        out = scaled_dot_product_attention(**{name: view(t) for name, t in arrays.items()}, **options)
    return torch.from_dlpack(out)


@dataclass(frozen=True)
class _StreamHandle:
    """A CUDA stream by its handle, speaking the CUDA stream protocol CuPy 14 reads foreign streams through."""

    handle: int

    def __cuda_stream__(self) -> tuple[int, int]:
        return 0, self.handle


def _cupy_stream(cupy: Any, stream: Any) -> Any:
    """torch's CUDA ``stream`` as a CuPy stream (a context manager making it CuPy's current one)."""
    if hasattr(cupy.cuda.Stream, "from_external"):  # CuPy 14; ExternalStream is deprecated there
        return cupy.cuda.Stream.from_external(_StreamHandle(stream.cuda_stream))
    return cupy.cuda.ExternalStream(stream.cuda_stream, stream.device.index)


def _cupy() -> Any:
    """CuPy, imported on the first CUDA call of the cupy route (a test may stand another module in)."""
    import cupy

    return cupy


def _numpy_views(arrays: dict[str, Any]) -> dict[str, Any] | None:
    """NumPy views of CPU tensors that need no gradient, or None where one cannot be viewed (another device, grad,
    float8 without ml_dtypes): NumPy's adapter (numba kernels, a thread pool) is measured faster than the torch
    adapter on TabPFN's calls (``benchmarks/bench_tabpfn_backend.py``). Views share memory, except bfloat16
    tensors (TabPFN's autocast), which NumPy lacks: they become float32 copies, exact, the dtype every product
    is computed in anyway (``_attend`` rounds the output back to bfloat16); a dense call's keys and values then cost
    twice their bfloat16 bytes once more, beside the call's memory budget."""
    from ._backends import resolve_backend

    if any(t.device.type != "cpu" or t.requires_grad for t in arrays.values()):
        return None
    be = resolve_backend("torch")
    try:
        return {name: be.to_numpy(t) for name, t in arrays.items()}
    except TypeError:  # float8 without ml_dtypes
        return None


@keyword_hints
def register(*, policy: str = "auto", batch_invariant: bool = False,
             memory_budget: int | str | None = None) -> TabPFNAttentionBackend:
    """Register mha_cupy in TabPFN 9's attention-backend registry, consulted first, and return the backend.

    Parameters
    ----------
    policy : {"auto", "all"}
        ``"auto"`` takes only the calls where we are measured at least as fast
        or leaner than TabPFN's own path (``AUTO_RULE``); ``"all"`` takes every
        call we can run (CPU tensors of a float dtype; CUDA ones too, outside
        grad mode, where ``CUDA_ENABLED`` is set), for determinism and
        ``batch_invariant``.
    batch_invariant : bool
        Run every call in mha_cupy's batch-invariant mode (see
        ``scaled_dot_product_attention``).
    memory_budget : int or str, optional
        Working-set budget of each call; default the per-device one.

    Registering again with the same options returns the registered backend;
    with other options it replaces it. Raises ``ValueError``/``TypeError`` for
    bad options and ``ImportError`` when tabpfn 9 is not installed (also when
    an older tabpfn is, or importing tabpfn fails).

    ``stats()`` counts the calls the new backend takes and declines. A
    ``UserWarning`` (once per registration) names the decline reasons when the
    first forward pass of a TabPFN model over test rows after registering
    took no call at all (see ``_watch_first_predict``).

    Examples
    --------
    >>> import mha_cupy.tabpfn
    >>> backend = mha_cupy.tabpfn.register(policy="all")
    >>> mha_cupy.tabpfn.registered() is backend, mha_cupy.tabpfn.stats()
    (True, {'taken': 0, 'declined': {}})
    >>> mha_cupy.tabpfn.unregister()
    >>> mha_cupy.tabpfn.registered() is None
    True
    """
    global _latest  # noqa: PLW0603
    if policy not in POLICIES:
        msg = f"policy must be one of {POLICIES}, got {policy!r}"
        raise ValueError(msg)
    check_bool(batch_invariant, "batch_invariant")
    if memory_budget is not None:
        parse_memory_budget(memory_budget)
    registry = _registry()
    _define_op()
    wanted = TabPFNAttentionBackend(policy=policy, batch_invariant=batch_invariant, memory_budget=memory_budget)
    with _lock:
        current = registered()
        if current is not None and _options(current) == _options(wanted):
            return current
        registry.unregister_attention_backend(BACKEND_NAME)
        registry.register_attention_backend(wanted)
        _latest = wanted
        _set_watch(_watch_first_predict(wanted))
    return wanted


def unregister() -> None:
    """Remove mha_cupy from TabPFN's registry (nothing happens when it is not registered); ``stats()`` keeps the
    counts of the backend until the next ``register``."""
    with _lock:
        _registry().unregister_attention_backend(BACKEND_NAME)
        _set_watch(None)


def registered() -> TabPFNAttentionBackend | None:
    """The mha_cupy backend now in TabPFN's registry, or None."""
    found = [b for b in _registry().registered_attention_backends() if b.name == BACKEND_NAME]
    return found[0] if found else None


def stats() -> dict[str, Any]:
    """The attention calls TabPFN offered the backend ``register`` made last, since then (or since
    ``reset_stats()``): ``{"taken": int, "declined": {reason: int}}``, reasons most frequent first, e.g.
    ``{"taken": 0, "declined": {"fewer than 8192 keys (training rows)": 16}}``. Zeros before any ``register``.

    Every call TabPFN makes while mha_cupy is registered is counted once. Inside regions ``torch.compile``
    compiled, calls are decided once while tracing: those we took count as taken each time they run
    (``OP_NAME``), those we declined are not counted.
    """
    backend = _latest
    return backend.counts.snapshot() if backend is not None else {"taken": 0, "declined": {}}


def reset_stats() -> None:
    """Set ``stats()`` back to zero (it does not warn again: see ``register``)."""
    backend = _latest
    if backend is not None:
        backend.counts.reset()


def _set_watch(handle: Any) -> None:
    """Replace the forward hook waiting for the first predicting pass (call with ``_lock`` held)."""
    global _watch
    if _watch is not None:
        _watch.remove()
    _watch = handle


def _stop_watching(handle: Any) -> bool:
    """Remove ``handle`` if it is still the watch; whether it was (so one pass of many threads warns)."""
    with _lock:
        if _watch is not handle:
            return False
        _set_watch(None)
        return True


def _watch_first_predict(backend: TabPFNAttentionBackend) -> Any:
    """A one-shot forward hook on every torch module (``register_module_forward_hook``) that waits for the first
    forward pass of a TabPFN model (``tabpfn.architectures.interface.Architecture``) over test rows, i.e. not a
    ``fit_with_cache`` fit building its KV cache (``return_kv_cache=True``), then removes itself and warns when
    ``backend`` took no call since it was registered. Returns the hook's handle.

    TabPFN's estimators run one such pass per group of ensemble members on each predict, all over the same
    training rows, so the first pass stands for the whole predict; when it returns, every attention call of that
    pass has been offered (``register_module_forward_hook`` needs torch 2.1; tabpfn 9 needs 2.5). Until then every
    module call in the process takes torch's hook path (a few microseconds each)."""
    import torch
    from tabpfn.architectures.interface import Architecture

    def hook(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        del args, output
        if not isinstance(module, Architecture) or kwargs.get("return_kv_cache") or not _stop_watching(handle):
            return
        counts = backend.counts.snapshot()
        if counts["taken"] == 0:
            warnings.warn(_nothing_taken(backend.policy, counts["declined"]), UserWarning, stacklevel=1)

    handle = torch.nn.modules.module.register_module_forward_hook(hook, with_kwargs=True)
    return handle


def _nothing_taken(policy: str, declined: dict[str, int]) -> str:
    reasons = ", ".join(f"{reason}: {n}" for reason, n in declined.items()) or "none offered"
    return (f"mha_cupy.tabpfn: a TabPFN predict ran without mha_cupy taking any attention call (policy={policy!r}; "
            f"declined since register(): {reasons}). policy='auto' takes only {AUTO_RULE}, and TabPFN's keys are "
            f"its training rows; register(policy='all') takes every call mha_cupy can run. mha_cupy.tabpfn.stats() "
            f"counts the calls; this warning comes once per register().")


def _options(backend: TabPFNAttentionBackend) -> tuple[Any, ...]:
    return backend.policy, backend.batch_invariant, backend.memory_budget
