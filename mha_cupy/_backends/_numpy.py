"""NumPy: the CPU reference. Element-wise kernels run on one core, so blocks go to a thread pool."""

from __future__ import annotations

import contextlib
import functools
import math
import os
from contextlib import AbstractContextManager as ContextManager
from typing import Any

import array_api_compat
import numpy

from . import _numba
from ._base import Backend

__all__ = ["DEFAULT_DTYPE", "NumpyBackend"]

#: The layer's default dtype, spelled as in the reference API; it means float32 of
#: whichever namespace the layer lives in.
DEFAULT_DTYPE = numpy.float32


@functools.cache
def _blas_controller() -> Any:
    """threadpoolctl's view of the loaded BLAS, found once (finding it costs ~3 ms a call)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # still correct, only slower
        return None
    return ThreadpoolController()


#: Dtypes of the compiled fixed-order product (others take the element-wise one, same bits).
_COMPILED_MATMUL = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))


def _compiled_matmul(a: numpy.ndarray, b: numpy.ndarray) -> bool:
    """Whether the fixed-order ``a @ b`` can run compiled: numba present, one float dtype, equal leading dims."""
    return (_numba.load() is not None and a.dtype == b.dtype and a.dtype in _COMPILED_MATMUL
            and a.shape[:-2] == b.shape[:-2])


#: ``attend_chunk``'s mask when nothing is hidden (the kernel then does not read it).
_ALL_ALLOWED = numpy.ones((1, 1, 1, 1, 1), dtype=bool)


def _stack(a: numpy.ndarray) -> numpy.ndarray:
    """``a [..., M, D]`` as a contiguous stack ``[P, M, D]`` (a view where ``a`` is contiguous; P, M or D may be 0)."""
    return numpy.ascontiguousarray(a).reshape(math.prod(a.shape[:-2]), *a.shape[-2:])


class NumpyBackend(Backend):
    name = "numpy"
    package = "numpy"
    install_hint = "pip install numpy"
    matmul_writes_out = True

    @staticmethod
    def is_namespace(module: Any) -> bool:
        return array_api_compat.is_numpy_namespace(module)

    @staticmethod
    def namespace_of_module(module: Any) -> Any:
        return array_api_compat.array_namespace(numpy.empty(0))

    def default_workers(self, device: Any) -> int:
        return max(1, os.cpu_count() or 1)

    def parallel_section(self) -> ContextManager[None]:
        # NumPy releases the GIL in its kernels; OpenBLAS is held to one thread so that
        # the workers do not oversubscribe the cores.
        controller = _blas_controller()
        return contextlib.nullcontext() if controller is None else controller.limit(limits=1, user_api="blas")

    def describe_device(self, device: Any) -> dict[str, Any]:
        kernels = _numba.load()
        if kernels is not None:
            state = f"numba {kernels.version}"
        elif _numba.switched_off():
            state = f"off ({_numba.ENV_SWITCH}=0)"
        else:
            state = 'none: numba is not installed (pip install ".[fast]")'
        simd = numpy.show_config(mode="dicts")["SIMD Extensions"]  # what NumPy dispatches on this CPU, now
        return {
            "compiled_kernels": state,
            "simd": {"baseline": simd.get("baseline", []), "found": simd.get("found", [])},
        }

    def quantized_dtypes(self) -> dict[str, Any]:
        found = super().quantized_dtypes()
        try:  # NumPy has no float8; ml_dtypes (a JAX dependency) adds it
            import ml_dtypes
        except ImportError:
            return found
        return {**found, "float8_e4m3fn": numpy.dtype(ml_dtypes.float8_e4m3fn)}

    def exp_(self, x: Any) -> Any:
        return numpy.exp(x, out=x)

    def matmul(self, a: Any, b: Any, *, fixed_order: bool = False) -> Any:
        if not (fixed_order and _compiled_matmul(a, b)):
            return super().matmul(a, b, fixed_order=fixed_order)  # half precisions: in float32
        out = numpy.empty((*a.shape[:-1], b.shape[-1]), dtype=a.dtype)
        _numba.load().matmul_fixed(_stack(a), _stack(b), _stack(out))
        return out

    def matmul_into(self, a: Any, b: Any, out: Any, *, fixed_order: bool = False) -> None:
        if not fixed_order:
            numpy.matmul(a, b, out=out)
        elif _compiled_matmul(a, b) and out.flags.c_contiguous and out.dtype == a.dtype:
            _numba.load().matmul_fixed(_stack(a), _stack(b), _stack(out))
        else:
            out[...] = super().matmul(a, b, fixed_order=True)

    def fuses_fixed_order(self, dtype: Any) -> bool:
        return _numba.load() is not None and self.compute_dtype(dtype) == numpy.float32

    def attend_chunk(self, qb: Any, kb: Any, vb: Any, m: Any, l: Any, acc: Any, allowed: Any, *,
                     fixed_order: bool, width: int) -> bool:
        kernels = _numba.load()
        # The same conditions as fuses_fixed_order (the plan left out the query tiles on that promise): the
        # running state is the loop's own, C-contiguous, updated in place.
        if kernels is None or not fixed_order or qb.dtype != numpy.float32 or kb.dtype != qb.dtype:
            return False
        if not all(a.flags.c_contiguous for a in (m, l, acc)) or vb.dtype != qb.dtype or qb.shape[3] == 0:
            return False  # (head size 0: the scores are 0, the step-by-step path takes it)
        qb = numpy.ascontiguousarray(qb)
        nb, K, R, H = qb.shape
        s, V = kb.shape[-1], vb.shape[-1]
        kt = numpy.ascontiguousarray(kb).reshape(nb * K, H, s)
        v = numpy.ascontiguousarray(vb).reshape(nb * K, s, V)
        # A mask broadcast along the keys (a [.., 1] mask, the query-length condition) read as one of s keys.
        mask = _ALL_ALLOWED if allowed is None else numpy.broadcast_to(allowed, (*allowed.shape[:-1], s))
        kernels.attend_chunk(qb.reshape(nb * K, R, H), kt, v, m.reshape(nb * K, R), l.reshape(nb * K, R),
                             acc.reshape(nb * K, R, V), mask, allowed is not None, K, m.shape[3],
                             numpy.empty((4, max(s, width)), numpy.float32), numpy.empty((4, V), numpy.float32))
        return True

    def online_softmax(self, scores: Any, m: Any, l: Any, acc: Any, scalars: tuple[Any, Any, Any]) -> tuple[Any, ...]:
        kernels = _numba.load()
        arrays = (scores, m, l, acc)
        if kernels is None or scores.dtype != numpy.float32 or not all(a.flags.c_contiguous for a in arrays):
            return super().online_softmax(scores, m, l, acc, scalars)
        rows = m.size
        kernels.softmax_chunk(scores.reshape(rows, -1), m.reshape(rows), l.reshape(rows), acc.reshape(rows, -1))
        return scores, m, l, acc
