"""Compare backends and dtypes with ``mha_cupy.compare``: every usable library, float64 / float32 / float16.

Run: ``python examples/compare_backends_dtypes.py [--quick]``.
One layer, one input; the reference is the float64 NumPy result. Each row is
the layer moved to a backend and dtype, compared by ``mha_cupy.compare``:
scaled error, ulps in the lower precision, and whether it is within the
dtype's tolerance (float64 1e-10, float32 1e-5, float16 2**-9).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import mha_cupy

BACKENDS = ("numpy", "array_api_strict", "torch", "jax", "cupy")


def layer_in(name: str, dtype: str, weights: dict) -> mha_cupy.MultiHeadAttention:
    layer = mha_cupy.MultiHeadAttention(emsize=64, nhead=4, d_k=16, d_v=16, dtype=dtype, xp=name)
    xp = layer.xp
    layer.set_parameters(**{n: xp.asarray(w.astype(dtype), device=layer.device) for n, w in weights.items()})
    return layer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (for the tests)")
    args = parser.parse_args(argv)
    x = np.random.default_rng(0).standard_normal((2, 16 if args.quick else 512, 64))
    base = mha_cupy.MultiHeadAttention(emsize=64, nhead=4, d_k=16, d_v=16, dtype="float64", seed=0)
    weights = {"w_qkv": base.w_qkv, "w_out": base.w_out}
    reference = base(x)
    failed = 0
    for name in BACKENDS:
        for dtype in ("float64", "float32", "float16"):
            try:
                layer = layer_in(name, dtype, weights)
            except (mha_cupy.BackendUnavailableError, TypeError) as exc:  # not installed, or no such dtype there
                print(f"{name:16s} {dtype:8s} skipped: {str(exc).splitlines()[0][:100]}")
                continue
            c = mha_cupy.compare(layer(layer.xp.asarray(x.astype(dtype), device=layer.device)), reference)
            failed += not c.ok
            print(f"{name:16s} {dtype:8s} {c}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
