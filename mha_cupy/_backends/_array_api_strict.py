"""array_api_strict: the standard and nothing else, with a second device that refuses mixing
and host conversion the way a GPU library does."""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy

from ._base import Backend

__all__ = ["ArrayApiStrictBackend"]


class ArrayApiStrictBackend(Backend):
    name = "array_api_strict"
    package = "array_api_strict"
    install_hint = "pip install array-api-strict (or, from a checkout, pip install \".[test]\")"

    @staticmethod
    def is_namespace(module: Any) -> bool:
        return array_api_compat.is_array_api_strict_namespace(module)

    def to_numpy(self, x: Any) -> numpy.ndarray:
        host = self.xp.asarray(x, device=self.xp.Device("CPU_DEVICE"))
        return numpy.asarray(host)
