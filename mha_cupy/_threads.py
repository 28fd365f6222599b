"""The thread pool over independent pieces of work, for CPU libraries whose element-wise kernels
run on one core (NumPy: its adapter asks for one worker per core and holds BLAS to one thread
inside ``parallel_section``, so that BLAS's own threads neither oversubscribe the cores nor spin
beside ours). Libraries that parallelise every operation themselves get one worker.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from ._backends import Backend, device_of

__all__ = ["INVARIANT_COLUMNS", "run_blocks", "matmul_rows"]

#: Fewest rows per worker for which ``matmul_rows`` splits a product.
MIN_ROWS_PER_WORKER = 256
#: ``batch_invariant`` products are padded to a multiple of this many output columns: torch's CPU
#: GEMMs give a row other bits at another position in the product otherwise (measured with 5, 7 and 9
#: columns; 16 and 32 do not).
INVARIANT_COLUMNS = 16


@functools.lru_cache(maxsize=None)
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


def matmul_rows(a: Any, b: Any, *, be: Backend, workers: int, tile: int | None = None) -> Any:
    """``a [M, K] @ b [K, N]``, its rows split over ``workers`` threads (each a one-thread GEMM) where the
    library parallelises through our pool; one ``matmul`` elsewhere.

    With ``tile``, every product is ``[tile, K] @ [K, N]`` (the last rows, and the columns up to a
    multiple of ``INVARIANT_COLUMNS``, padded with zeros), so each row's result does not depend on how
    many rows came with it (``batch_invariant``).
    """
    xp, rows, cols = be.xp, a.shape[0], b.shape[1]
    if tile is None:
        if workers <= 1 or rows < workers * MIN_ROWS_PER_WORKER or not be.item_assignment:
            return xp.matmul(a, b)
        return _matmul_blocks(a, b, -(-rows // workers), be=be, workers=workers)
    if rows % tile:
        a = xp.concat([a, xp.zeros((-rows % tile, a.shape[1]), dtype=a.dtype, device=device_of(a))], axis=0)
    if cols % INVARIANT_COLUMNS:
        b = xp.concat([b, xp.zeros((b.shape[0], -cols % INVARIANT_COLUMNS), dtype=b.dtype, device=device_of(b))], axis=1)
    return _matmul_blocks(a, b, tile, be=be, workers=workers)[:rows, :cols]


def _matmul_blocks(a: Any, b: Any, step: int, *, be: Backend, workers: int) -> Any:
    """``a @ b`` as products of ``step`` rows each (written in place, or concatenated where arrays are immutable)."""
    xp, starts = be.xp, range(0, a.shape[0], step)
    if not be.item_assignment:
        return xp.concat([xp.matmul(a[i0:i0 + step, ...], b) for i0 in starts], axis=0)
    out = xp.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device=device_of(a))

    def part(i0: int) -> None:
        be.matmul_into(a[i0:i0 + step, ...], b, out[i0:i0 + step, ...])

    run_blocks(part, [(i0,) for i0 in starts], workers, be)
    return out
