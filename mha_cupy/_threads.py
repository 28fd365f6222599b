"""The thread pool over independent attention blocks, for CPU libraries whose element-wise
kernels run on one core (NumPy).

NumPy releases the GIL in its kernels, so blocks on separate threads run in
parallel; OpenBLAS is held to one thread meanwhile (through ``threadpoolctl``)
so that the workers do not oversubscribe the cores. Libraries that already
parallelise every operation (PyTorch on the CPU) or run on a GPU (CuPy) get
one worker.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

from ._namespace import namespace_name
from ._validation import check_positive_int

__all__ = ["resolve_workers", "run_blocks"]

_POOLED = ("numpy",)


def resolve_workers(workers: Any, xp: Any) -> int:
    """``workers`` as given (an int >= 1), or by default the core count for NumPy and 1 elsewhere."""
    if workers is None:
        return max(1, os.cpu_count() or 1) if namespace_name(xp) in _POOLED else 1
    return check_positive_int(workers, "workers")


@contextlib.contextmanager
def _single_threaded_blas(active: bool) -> Iterator[None]:
    if not active:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # still correct, only slower
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def run_blocks(fn: Callable[..., None], blocks: Sequence[tuple], workers: int) -> None:
    """Call ``fn(*block)`` for every block, on ``workers`` threads when there is more than one."""
    if workers <= 1 or len(blocks) <= 1:
        for blk in blocks:
            fn(*blk)
        return
    with _single_threaded_blas(True), ThreadPoolExecutor(max_workers=min(workers, len(blocks))) as pool:
        for _ in pool.map(lambda blk: fn(*blk), blocks):
            pass
