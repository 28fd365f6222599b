"""CuPy: CUDA arrays. Only what differs from the standard: loading with a clear error where no
GPU or driver is present, device memory for the default budget, and the host copy."""

from __future__ import annotations

import contextlib
import functools
import operator
from typing import Any

import array_api_compat
import numpy

from ._base import Backend, BackendUnavailableError

__all__ = ["CupyBackend"]


class CupyBackend(Backend):
    name = "cupy"
    package = "cupy"
    install_hint = (
        "install CuPy for your CUDA version from a checkout with `pip install \".[cuda12]\"` "
        "(CUDA 12) or `pip install \".[cuda13]\"` (CUDA 13), or `pip install cupy-cuda12x`"
    )

    @staticmethod
    def is_namespace(module: Any) -> bool:
        return array_api_compat.is_cupy_namespace(module)

    @classmethod
    def load(cls) -> Any:
        cupy = cls.import_package()
        if not _usable(cupy):
            msg = (
                "xp='cupy': CuPy is installed but finds no usable CUDA driver or GPU "
                "(cupy.is_available() is False, or a first small kernel failed); run on a machine with an NVIDIA GPU "
                "and "
                f"driver, or use xp='numpy'. If the CuPy build does not match the driver, {cls.install_hint}"
            )
            raise BackendUnavailableError(msg, library="cupy", reason="no-device")
        return array_api_compat.array_namespace(cupy.empty(0))

    @classmethod
    def namespace_of_module(cls, module: Any) -> Any:
        return cls.load()

    def is_cpu(self, device: Any) -> bool:
        return False

    def check_device(self, device: Any) -> Any:
        """``device`` as a ``cupy.cuda.Device``: one, or its index; a ValueError naming the devices there are."""
        import cupy

        given = device
        if not isinstance(device, (bool, cupy.cuda.Device)):
            with contextlib.suppress(TypeError):  # an index: int, NumPy integer
                device = cupy.cuda.Device(operator.index(device))
        count = cupy.cuda.runtime.getDeviceCount()
        if not isinstance(device, cupy.cuda.Device) or not 0 <= device.id < count:
            msg = (f"device must be one of cupy's devices {[cupy.cuda.Device(i) for i in range(count)]} or its "
                   f"index, got {given!r}")
            raise ValueError(msg)
        return device

    def free_memory(self, device: Any) -> int:
        """The driver's free bytes on ``device`` plus what CuPy's pool holds unused there, capped by the pool's
        limit (``CUPY_GPU_MEMORY_LIMIT`` or ``set_limit``; the pool answers for the current device)."""
        import cupy

        pool = cupy.get_default_memory_pool()
        with device:
            free = int(device.mem_info[0]) + int(pool.free_bytes())
            limit = int(pool.get_limit())
            return free if limit == 0 else min(free, max(0, limit - int(pool.used_bytes())))

    def describe_device(self, device: Any) -> dict[str, Any]:
        import cupy

        free, total = device.mem_info
        name = cupy.cuda.runtime.getDeviceProperties(device.id)["name"]  # bytes, per CUDA's cudaDeviceProp
        return {"name": name.decode() if isinstance(name, bytes) else str(name), "memory_total": int(total),
                "memory_free": int(free)}

    def to_numpy(self, x: Any) -> numpy.ndarray:
        return x.get()

    def exp_(self, x: Any) -> Any:
        import cupy

        return cupy.exp(x, out=x)


@functools.lru_cache(maxsize=1)
def _usable(cupy: Any) -> bool:
    """Whether CuPy can run here, asked once a process: ``is_available()`` only counts devices, so one small kernel
    also proves NVRTC and the runtime load (and waits for the GPU, once)."""
    try:
        return bool(cupy.is_available()) and int((cupy.arange(2) + 1).sum()) == 3
    except Exception:  # noqa: BLE001 - a broken driver or a missing NVRTC raises instead of answering False
        return False
