"""mha_cupy as an attention backend of TabPFN 9 (``tabpfn>=9``; today's TabPFN-2.5, 2.6, 3 and 3.5 models).

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

- never: tensors off the CPU (our CuPy and torch-CUDA paths have not run on a
  GPU yet), dtypes other than float32/float64/float16/bfloat16, quantized
  dtypes other than int8/float8_e4m3fn, calls while ``torch.compile`` traces,
  quantized calls with grad mode on (they take no gradients);
- ``policy="all"``: every other call (determinism, ``batch_invariant``), those
  in grad mode through our autograd node;
- ``policy="auto"``: of those, only calls outside grad mode where the
  benchmark (``benchmarks/bench_tabpfn_backend.py``) shows us at least as fast
  or leaner: calls over many keys, from a quantized cache (no dense copy;
  0.3-0.9 of TabPFN's time at 20,000 keys), or dense float32 ones of few
  query rows (TabPFN's decoder over the training rows): ``AUTO_RULE`` below.

Importing this module imports neither torch nor tabpfn; ``register`` does.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any, ClassVar

from ._budget import parse_memory_budget
from ._validation import check_bool, keyword_hints
from .attention import scaled_dot_product_attention

__all__ = ["POLICIES", "AUTO_RULE", "AUTO_MAX_QUERY_ROWS", "AUTO_MIN_KEYS", "AUTO_MIN_HEAD_DIM", "BACKEND_NAME", "TabPFNAttentionBackend", "register", "registered", "unregister"]

#: The policies ``register`` takes.
POLICIES = ("auto", "all")
#: The name the backend is registered under.
BACKEND_NAME = "mha_cupy"
#: ``policy="auto"`` takes calls over many keys: quantized ones, and dense ones of few query rows (batch × queries)
#: with wide heads. Below these key counts TabPFN's own path measured faster (per-call overheads dominate); dense
#: calls of 513-1024 query rows are about 1.2x slower alone but leaner (no contiguous copies of k and v), and the
#: whole predict at 1024 test rows measured as fast.
AUTO_MIN_KEYS = 8192
AUTO_MAX_QUERY_ROWS = 1024
AUTO_MIN_HEAD_DIM = 32
#: What ``policy="auto"`` takes, in words (the numbers are in the README and ``benchmarks/results``).
AUTO_RULE = (f"calls over at least {AUTO_MIN_KEYS} keys: from a quantized (int8 or float8_e4m3fn) KV cache, or "
             f"dense float32 ones of at most {AUTO_MAX_QUERY_ROWS} query rows with heads of {AUTO_MIN_HEAD_DIM} or "
             f"more; outside grad mode, on the CPU")
_FLOAT_DTYPES = ("float32", "float64", "float16", "bfloat16")
_QUANTIZED_DTYPES = ("int8", "float8_e4m3fn")
_lock = threading.Lock()


@functools.cache
def _torch_dtypes(names: tuple[str, ...]) -> frozenset[Any]:
    import torch

    return frozenset(getattr(torch, n) for n in names)


@functools.cache
def _registry() -> Any:
    """TabPFN 9's backend registry, imported on first use."""
    try:
        from tabpfn.architectures.shared import attention_backends
    except ImportError as exc:
        msg = (f"mha_cupy.tabpfn needs tabpfn 9 with its attention-backend registry "
               f"(tabpfn.architectures.shared.attention_backends): pip install \"tabpfn>=9\" ({exc})")
        raise ImportError(msg) from exc
    return attention_backends


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
    name: ClassVar[str] = BACKEND_NAME
    #: TabPFN hands quantized cache entries over as stored, not dequantized.
    consumes_quantized_kv: ClassVar[bool] = True

    def is_preferred(self, spec: Any) -> bool:
        """Whether to take a call described by TabPFN's ``AttentionSpec`` (cheap: shapes and flags only)."""
        import torch

        if spec.device.type != "cpu" or spec.dtype not in _torch_dtypes(_FLOAT_DTYPES) or spec.seq_len_kv is None:
            return False
        quantized = spec.quantized_kv_dtype is not None
        if quantized and spec.quantized_kv_dtype not in _torch_dtypes(_QUANTIZED_DTYPES):
            return False
        if torch.compiler.is_compiling() or (quantized and spec.is_grad_enabled):
            return False
        if self.policy == "all":
            return True
        if spec.is_grad_enabled or spec.seq_len_kv < AUTO_MIN_KEYS:
            return False
        return quantized or (spec.dtype == torch.float32 and spec.head_dim >= AUTO_MIN_HEAD_DIM
                             and (spec.batch_size or 1) * (spec.seq_len_q or 0) <= AUTO_MAX_QUERY_ROWS)

    def run(self, q_BSHD: Any, k_BSJD: Any, v_BSJD: Any, *, quantized_kv: Any = None, **kwargs: Any) -> Any:
        """Attention of ``q [B, T, N, H]`` over dense ``k``/``v [B, S, K, H]``, or over ``quantized_kv``'s keys and
        values with their scales (then ``k``/``v`` are None); returns ``[B, T, N, H]`` in q's dtype."""
        del kwargs  # informational context TabPFN may add
        arrays = {"q": q_BSHD, "k": k_BSJD, "v": v_BSJD}
        if quantized_kv is not None:
            arrays.update(k=quantized_kv.key, v=quantized_kv.value, k_scale=quantized_kv.key_scale,
                          v_scale=quantized_kv.value_scale)
        views = _numpy_views(arrays)
        if views is None:
            return scaled_dot_product_attention(**arrays, batch_invariant=self.batch_invariant,
                                                memory_budget=self.memory_budget)
        import torch

        out = scaled_dot_product_attention(**views, batch_invariant=self.batch_invariant,
                                           memory_budget=self.memory_budget)
        return torch.from_numpy(out)


def _numpy_views(arrays: dict[str, Any]) -> dict[str, Any] | None:
    """Zero-copy NumPy views of CPU tensors that need no gradient, or None where one cannot be viewed (another
    device, grad, bfloat16, float8 without ml_dtypes): NumPy's adapter (numba kernels, a thread pool) is
    measured faster than the torch adapter on TabPFN's calls (``benchmarks/bench_tabpfn_backend.py``)."""
    import torch

    from ._backends import resolve_backend

    if any(t.device.type != "cpu" or t.requires_grad or t.dtype == torch.bfloat16 for t in arrays.values()):
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
        call we can run (CPU tensors of a float dtype), for determinism and
        ``batch_invariant``.
    batch_invariant : bool
        Run every call in mha_cupy's batch-invariant mode (see
        ``scaled_dot_product_attention``).
    memory_budget : int or str, optional
        Working-set budget of each call; default the per-device one.

    Registering again with the same options returns the registered backend;
    with other options it replaces it. Raises ``ValueError``/``TypeError`` for
    bad options and ``ImportError`` when tabpfn 9 is not installed.
    """
    if policy not in POLICIES:
        msg = f"policy must be one of {POLICIES}, got {policy!r}"
        raise ValueError(msg)
    check_bool(batch_invariant, "batch_invariant")
    if memory_budget is not None:
        parse_memory_budget(memory_budget)
    registry = _registry()
    wanted = TabPFNAttentionBackend(policy=policy, batch_invariant=batch_invariant, memory_budget=memory_budget)
    with _lock:
        current = registered()
        if current is not None and _options(current) == _options(wanted):
            return current
        registry.unregister_attention_backend(BACKEND_NAME)
        registry.register_attention_backend(wanted)
    return wanted


def unregister() -> None:
    """Remove mha_cupy from TabPFN's registry (nothing happens when it is not registered)."""
    with _lock:
        _registry().unregister_attention_backend(BACKEND_NAME)


def registered() -> TabPFNAttentionBackend | None:
    """The mha_cupy backend now in TabPFN's registry, or None."""
    found = [b for b in _registry().registered_attention_backends() if b.name == BACKEND_NAME]
    return found[0] if found else None


def _options(backend: TabPFNAttentionBackend) -> tuple[Any, ...]:
    return backend.policy, backend.batch_invariant, backend.memory_budget
