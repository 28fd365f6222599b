"""The thread pool over independent pieces of work, for CPU libraries whose element-wise kernels
run on one core (NumPy: its adapter asks for one worker per core and holds BLAS to one thread
inside ``parallel_section``, so that BLAS's own threads neither oversubscribe the cores nor spin
beside ours). Libraries that parallelise every operation themselves get one worker.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from collections.abc import Callable, Sequence

from ._backends import Backend, device_of
from ._plan import ceil_div

__all__ = ["run_blocks", "matmul_rows"]

#: Fewest rows per worker for which ``matmul_rows`` splits a product.
MIN_GEMM_ROWS_PER_WORKER = 256


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    """One pool per worker count for the process: starting threads on every call costs more than small blocks."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mha_cupy")


def run_blocks(fn: Callable[..., None], blocks: Sequence[tuple], workers: int, be: Backend) -> None:
    """Call ``fn(*block)`` for every block, on ``workers`` threads when there is more than one."""
    if workers <= 1 or len(blocks) <= 1:
        for blk in blocks:
            fn(*blk)
        return
    with be.parallel_section():
        for _ in _pool(min(workers, len(blocks))).map(lambda blk: fn(*blk), blocks):
            pass


def matmul_rows(a: Any, b: Any, *, be: Backend, workers: int, fixed_order: bool = False) -> Any:
    """``a [M, K] @ b [K, N]``, its rows split over ``workers`` threads (each a one-thread GEMM) where the
    library parallelises through our pool; one product elsewhere.

    With ``fixed_order`` the product is ``Backend.matmul``'s fixed-order one, so each row's result does not
    depend on how many rows came with it or where (``batch_invariant``).
    """
    rows = a.shape[0]
    if workers <= 1 or rows < workers * MIN_GEMM_ROWS_PER_WORKER or not be.item_assignment:
        return be.matmul(a, b, fixed_order=fixed_order)
    return _matmul_blocks(a, b, ceil_div(rows, workers), be=be, workers=workers, fixed_order=fixed_order)


def _matmul_blocks(a: Any, b: Any, step: int, *, be: Backend, workers: int, fixed_order: bool) -> Any:
    """``a @ b`` as products of ``step`` rows each, written in place."""
    out = be.xp.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device=device_of(a))

    def part(i0: int) -> None:
        be.matmul_into(a[i0:i0 + step, ...], b, out[i0:i0 + step, ...], fixed_order=fixed_order)

    run_blocks(part, [(i0,) for i0 in range(0, a.shape[0], step)], workers, be)
    return out
