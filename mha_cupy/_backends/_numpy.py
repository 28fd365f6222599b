"""NumPy: the CPU reference. Element-wise kernels run on one core, so blocks go to a thread pool."""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, ContextManager

import array_api_compat
import numpy

from ._base import Backend

__all__ = ["DEFAULT_DTYPE", "NumpyBackend"]

#: The layer's default dtype, spelled as in the reference API; it means float32 of
#: whichever namespace the layer lives in.
DEFAULT_DTYPE = numpy.float32


@functools.lru_cache(maxsize=None)
def _blas_controller() -> Any:
    """threadpoolctl's view of the loaded BLAS, found once (finding it costs ~3 ms a call)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # still correct, only slower
        return None
    return ThreadpoolController()


class NumpyBackend(Backend):
    name = "numpy"
    package = "numpy"
    install_hint = "pip install numpy"
    # numpy/_core/src/umath/matmul.c.src: the gufunc's outer loop calls BLAS once per matrix of the stack.
    batched_matmul_per_matrix = True
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

    def to_numpy(self, x: Any) -> numpy.ndarray:
        return numpy.asarray(x)

    def exp_(self, x: Any) -> Any:
        return numpy.exp(x, out=x)

    def matmul_into(self, a: Any, b: Any, out: Any) -> None:
        numpy.matmul(a, b, out=out)
