"""What every benchmark records beside its figures: the machine and the library versions."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path


def versions() -> dict:
    import array_api_compat
    import numpy

    import mha_cupy

    v = {"python": platform.python_version(), "numpy": numpy.__version__, "array_api_compat": array_api_compat.__version__,
         "mha_cupy": mha_cupy.__version__}
    try:
        import torch

        v["torch"] = torch.__version__
        v["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        v["tabpfn"] = metadata.version("tabpfn")
    except metadata.PackageNotFoundError:
        pass
    try:
        blas = numpy.show_config(mode="dicts")["Build Dependencies"]["blas"]
        v["numpy_blas"] = f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # noqa: BLE001
        pass
    return v


def machine() -> dict:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = _mem_total()
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1), "platform": platform.platform(),
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE")}


def _mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0
