"""NumPy: the CPU reference. Element-wise kernels run on one core, so blocks go to a thread pool."""

from __future__ import annotations

import contextlib
import os
from typing import Any, ContextManager

import array_api_compat
import numpy

from ._base import Backend

__all__ = ["DEFAULT_DTYPE", "NumpyBackend"]

#: The layer's default dtype, spelled as in the reference API; it means float32 of
#: whichever namespace the layer lives in.
DEFAULT_DTYPE = numpy.float32


class NumpyBackend(Backend):
    name = "numpy"
    package = "numpy"
    install_hint = "pip install numpy"

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
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # still correct, only slower
            return contextlib.nullcontext()
        return threadpool_limits(limits=1, user_api="blas")

    def to_numpy(self, x: Any) -> numpy.ndarray:
        return numpy.asarray(x)

    def exp_(self, x: Any) -> Any:
        return numpy.exp(x, out=x)
