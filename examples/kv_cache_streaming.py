"""Streaming with a KV cache
=========================

KV cache and streaming: cache the context once, then answer queries against it; append as rows arrive.

Run: ``python examples/kv_cache_streaming.py [--quick]``.
TabPFN caches its training rows' keys and values and reuses them for test
rows (``cache_kv`` / ``use_cached_kv``). With ``append_kv`` a stream of new rows
extends the cache in amortised O(new rows), and every call attends to all
rows so far: the result equals one call over the whole sequence.
"""

from __future__ import annotations

import numpy as np

import mha_cupy
from _needs import command_line, finish


def main(argv: list[str] | None = None) -> int:
    args = command_line(__doc__).parse_args(argv)
    n_train, n_test, step = (64, 8, 16) if args.quick else (4096, 512, 256)
    rng = np.random.default_rng(0)
    layer = mha_cupy.MultiHeadAttention(emsize=64, nhead=4, d_k=16, d_v=16, dtype="float64", seed=0)
    train = rng.standard_normal((1, n_train, 64))
    test = rng.standard_normal((1, n_test, 64))

    layer(train, cache_kv=True)                           # keys/values of the training rows, kept
    cached = layer(test, use_cached_kv=True)              # test rows attend to them; no recomputation
    direct = layer(test, train)                           # the same, recomputing keys and values
    print(f"cache {layer.kv_cache.shape}: test rows via the cache vs direct: {mha_cupy.compare(cached, direct)}")

    layer.empty_kv_cache()
    outputs = []
    for start in range(0, n_train, step):                 # rows arrive in pieces
        chunk = train[:, start:start + step]
        outputs.append(layer(chunk, cache_kv=True, append_kv=True))  # attends to every row so far
    print(f"streamed {n_train} rows in {n_train // step} pieces; cache now {layer.kv_cache.shape}")
    last = outputs[-1]
    whole = layer(train[:, -step:], train)                # the last piece against the whole sequence at once
    c = mha_cupy.compare(last, whole)
    print(f"last piece, streamed vs at once: {c}")
    return 0 if c.ok else 1


if __name__ == "__main__":
    finish(main())
