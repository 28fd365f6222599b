"""The thread pool over independent attention blocks, for CPU libraries whose element-wise
kernels run on one core (NumPy: its adapter asks for one worker per core and holds BLAS to one
thread inside the pool). Libraries that parallelise every operation themselves get one worker.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

from ._backends import Backend

__all__ = ["run_blocks"]


def run_blocks(fn: Callable[..., None], blocks: Sequence[tuple], workers: int, be: Backend) -> None:
    """Call ``fn(*block)`` for every block, on ``workers`` threads when there is more than one."""
    if workers <= 1 or len(blocks) <= 1:
        for blk in blocks:
            fn(*blk)
        return
    with be.parallel_section(), ThreadPoolExecutor(max_workers=min(workers, len(blocks))) as pool:
        for _ in pool.map(lambda blk: fn(*blk), blocks):
            pass
