"""Which CPU code paths run: NumPy's SIMD targets, OpenBLAS's core, numba's target, and the settings that
make an AVX-512 machine run the code paths of an AVX2 one (for benchmarks, tests and ``mha-cupy info``).

Every setting here must be in the environment before the library it steers is loaded, so callers put
them into a new process.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["AVX2_TORCH", "describe", "without_avx512"]

#: torch's own switches to AVX2 (ATen's kernels, MKL, oneDNN), for benchmarks that time torch beside us.
AVX2_TORCH = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
_SETTINGS = ("NPY_DISABLE_CPU_FEATURES", "OPENBLAS_CORETYPE", "NUMBA_CPU_NAME", "ATEN_CPU_CAPABILITY", "MHA_CUPY_NUMBA")


def numpy_simd() -> list[str]:
    """NumPy's dispatch targets in use here (what ``numpy.show_runtime()`` lists as found)."""
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

    return [f for f in __cpu_dispatch__ if __cpu_features__.get(f)]


def describe() -> dict[str, Any]:
    """NumPy's SIMD targets, OpenBLAS's core, numba's target and the environment settings that chose them."""
    info: dict[str, Any] = {"numpy_simd": numpy_simd()}
    try:
        from threadpoolctl import threadpool_info

        info["openblas_core"] = [
            i.get("architecture") for i in threadpool_info() if i.get("internal_api") == "openblas"
        ]
    except ImportError:
        info["openblas_core"] = None
    try:
        import numba
        from numba.core import config

        info["numba"] = {"version": numba.__version__, "cpu": config.CPU_NAME or "host",
                         "avx512": "host" if config.CPU_FEATURES is None else "+avx512f" in config.CPU_FEATURES}
    except ImportError:
        info["numba"] = None
    info.update({name: os.environ[name] for name in _SETTINGS if name in os.environ})
    return info


def without_avx512() -> dict[str, str]:
    """Environment settings that hold NumPy and numba to AVX2 on a CPU with AVX-512 (empty where there is none to
    hold back). OpenBLAS is left alone: its core is the machine's choice (``OPENBLAS_CORETYPE=Haswell`` does it,
    in a benchmark or by hand)."""
    avx512 = [f for f in numpy_simd() if "AVX512" in f or f == "X86_V4"]
    if not avx512:
        return {}
    settings = {"NPY_DISABLE_CPU_FEATURES": " ".join(avx512)}
    try:
        from llvmlite import binding
    except ImportError:
        return settings
    features = [f for f in binding.get_host_cpu_features().flatten().split(",") if f]
    off = ["-" + f[1:] if f[1:].startswith(("avx512", "amx", "evex512")) else f for f in features]
    return {**settings, "NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": ",".join(off)}
