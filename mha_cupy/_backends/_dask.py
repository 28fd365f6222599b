"""Dask: lazy arrays whose blocks are NumPy (or CuPy) arrays. Attention and the layer's projections
run once per block on the blocks' own library (``mha_cupy._lazy``); this adapter answers what
the rest of the package asks of a library, and names the blocks' library."""

from __future__ import annotations

import importlib
from typing import Any

import array_api_compat
import numpy

from ._base import Backend

__all__ = ["DaskBackend"]


class DaskBackend(Backend):
    name = "dask"
    package = "dask.array"
    install_hint = "install Dask from a checkout with `pip install \".[dask]\"` (dask[array,distributed])"
    #: Results are assembled lazily, never written into arrays.
    item_assignment = False
    #: Attention runs as one task per (batch, query, key) block of the inputs' chunks.
    lazy_blocks = True

    @staticmethod
    def is_namespace(module: Any) -> bool:
        return array_api_compat.is_dask_namespace(module) or getattr(module, "__name__", None) == "dask.array"

    @classmethod
    def load(cls) -> Any:
        cls.import_package()
        return importlib.import_module("array_api_compat.dask.array")

    @classmethod
    def namespace_of_module(cls, module: Any) -> Any:
        return cls.load()

    def default_workers(self, device: Any) -> int:
        return 1  # Dask runs blocks in parallel; each block's own loop stays on one thread

    def to_numpy(self, x: Any) -> numpy.ndarray:
        block = x.compute()  # NumPy, or CuPy blocks: copied to the host
        return numpy.asarray(block if isinstance(block, numpy.ndarray) else array_api_compat.to_device(block, "cpu"))

    def from_numpy(self, a: numpy.ndarray, device: Any) -> Any:
        import dask.array as da

        return da.from_array(a, chunks=a.shape)  # one chunk: weights are one key in any graph

    @staticmethod
    def meta_namespace(x: Any) -> Any:
        """The Array API namespace of a dask array's blocks (NumPy or CuPy)."""
        return array_api_compat.array_namespace(x._meta)
