"""Swap backends: NumPy and CuPy
=============================

Swap NumPy and CuPy: one layer, the same weights, moved with ``.to()``; the numbers agree.

Run: ``python examples/swap_backends.py [--quick]``. Without a usable GPU (no
CuPy, no driver, no device) it says why and runs the same code on a second CPU
library instead (PyTorch's CPU tensors if installed, else ``array_api_strict``),
so the script shows the swap on any machine.
"""

from __future__ import annotations

import numpy as np

import mha_cupy
from _needs import command_line, finish


def other_backend() -> str:
    for name in ("cupy", "torch", "array_api_strict"):
        try:
            mha_cupy.MultiHeadAttention(emsize=8, nhead=2, d_k=4, d_v=4, xp=name)
            return name
        except mha_cupy.BackendUnavailableError as exc:
            print(f"{name} not usable here: {exc}")
    raise SystemExit("no second backend installed: pip install torch or array-api-strict")


def main(argv: list[str] | None = None) -> int:
    args = command_line(__doc__).parse_args(argv)
    batch, length = (2, 64) if args.quick else (16, 1024)

    layer = mha_cupy.MultiHeadAttention(emsize=192, nhead=6, d_k=32, d_v=32, dtype="float32", seed=0)
    x = np.random.default_rng(0).standard_normal((batch, length, 192), dtype=np.float32)
    y_cpu = layer(x)

    name = other_backend()
    moved = layer.to(name)                      # same weights (and cache, seed) on the other library
    x_moved = moved.xp.asarray(x)               # a host-to-device copy for CuPy
    y_moved = moved(x_moved)                    # an array of that library, on its device
    print(f"{name}: output {type(y_moved).__module__}.{type(y_moved).__name__} {tuple(y_moved.shape)}")
    c = mha_cupy.compare(y_moved, y_cpu)        # moves both to the host, here only
    print(f"{name} vs numpy: {c}")
    return 0 if c.ok else 1


if __name__ == "__main__":
    finish(main())
