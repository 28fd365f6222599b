"""Scale out on Dask
=================

Scale out on Dask: a batch and a context larger than one worker should hold, on a LocalCluster.

Run: ``python examples/dask_scale_out.py [--quick]`` (needs ``pip install ".[dask]"``).

The layer moved with ``.to("dask")`` takes dask arrays and returns lazy ones:
the batch is split into chunks (one task per chunk, the weights one key in the
graph), and the training rows' keys/values are split along the sequence; each
key chunk's partial output and log-sum-exp is computed where the chunk lives and
the partials are merged by a tree of log-sum-exp merges. The cached context
stays lazy, with its chunks, for the test rows that follow.

The same code runs against a real cluster: replace the LocalCluster with
``Client("tcp://scheduler:8786")`` and load the data with ``dask.array`` from
shared storage (``da.from_zarr``, ``da.from_npy_stack``) instead of from memory.
On GPUs, ``dask_cuda.LocalCUDACluster()`` gives one worker per GPU, and arrays
with CuPy blocks (``x.map_blocks(cupy.asarray)``) run every task on CuPy; that
path has not been run here (no GPU).
"""

from __future__ import annotations

import time

import numpy as np

import mha_cupy
from _needs import command_line, finish, require


def main(argv: list[str] | None = None) -> int:
    args = command_line(__doc__, "dask").parse_args(argv)
    require("dask", "dask", "distributed")
    import dask.array as da
    from dask.distributed import Client, LocalCluster, progress

    groups, n_train, n_test, step = (4, 2048, 128, 512) if args.quick else (16, 65536, 2048, 8192)

    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster, \
            Client(cluster) as client:
        layer = mha_cupy.MultiHeadAttention(emsize=96, nhead=4, d_k=24, d_v=24, dtype="float32", seed=0)
        lazy = layer.to("dask")
        # Drawn where they are used (a graph holding the arrays would ship them all through the scheduler).
        # Feature groups split between tasks; the training rows split along the sequence.
        rng = da.random.default_rng(0)
        d_train = rng.standard_normal((groups, n_train, 96), chunks=(groups // 2, step, 96), dtype=np.float32)
        d_test = rng.standard_normal((groups, n_test, 96), chunks=(groups // 2, n_test, 96), dtype=np.float32)

        lazy(d_train, cache_kv=True)                      # lazy: nothing computed yet
        print(f"cached keys/values: {lazy.kv_cache.shape}, chunks {lazy.kv_cache.chunksize} (lazy)")
        y = lazy(d_test, use_cached_kv=True)
        print(f"output {y.shape}: {len(y.__dask_graph__())} tasks")
        t0 = time.perf_counter()
        future = client.compute(y)
        if not args.quick:
            progress(future)  # a progress bar while the tasks run (a minute and more)
            print()
        result = future.result()
        print(f"computed on {len(client.scheduler_info()['workers'])} workers in {time.perf_counter() - t0:.2f} s")

        train, test = client.compute([d_train, d_test], sync=True)
        c = mha_cupy.compare(result, layer(test, train))  # the same call on one machine, in memory
        print(f"dask vs one NumPy call: {c}")
        return 0 if c.ok else 1


if __name__ == "__main__":
    finish(main())
