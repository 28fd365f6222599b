"""Compiled CPU kernels for NumPy arrays (numba, the optional ``fast`` extra).

Three kernels, used through the adapters only: ``softmax_chunk`` by NumPy's
``Backend.online_softmax``, ``matmul_fixed`` by NumPy's and torch-CPU's
``Backend.matmul(fixed_order=True)``, ``attend_chunk`` by NumPy's ``Backend.attend_chunk``:

- ``softmax_chunk``: one key chunk of the online softmax over a float32 score
  tile, fused row by row while the row is in L1: the running max, the
  subtraction, ``exp``, the row sum, and the rescaling of the running sum and
  accumulator. NumPy runs these as five passes over the tile, and on CPUs
  without AVX-512 its float32 ``exp`` is not vectorised (issue 18: 2.96 ms for a
  1024 x 1024 tile against 2.41 ms for both GEMMs). The ``exp`` here is
  Cephes' ``expf`` (range reduction by ``ln 2`` in two parts and a degree-5
  polynomial), written so that LLVM vectorises it for AVX2 and AVX-512:
  within 2 ulp of the correctly rounded value on ``[-87.3, 0]``, exactly 0 below
  (``-inf`` included), NaN for NaN.
- ``matmul_fixed``: ``a @ b`` where every output element is
  ``((0 + a0 b0) + a1 b1) + ...`` in the order of the inner index, each product
  and sum rounded (no FMA, no reassociation). A row's result then does not
  depend on its position in the product or on the other rows, on any CPU and
  whatever the BLAS (``batch_invariant``); the Array API version in
  ``_base.fixed_order_matmul`` gives the same bits, slower. Four rows at a
  time share every element of ``b`` loaded, and four steps of the inner index
  are added per store (``(((o + a0 b0) + a1 b1) + ...)`` rounds exactly as four
  separate steps): the layout, not the order, makes it fast.
- ``attend_chunk``: one key chunk of ``batch_invariant`` attention for every
  (batch row, kv head) pair in one call: ``matmul_fixed``'s ``q k^T``, the hidden
  keys at ``-inf``, ``softmax_chunk``'s update and ``acc += matmul_fixed(p, v)``,
  per block of four query rows while their scores are in L1; element for
  element the arithmetic of those steps run one by one, and the same for every
  query row whatever its block.

Compiled on first use and cached on disk (``cache=True``); ``nogil`` so that
the thread pool over blocks runs them side by side. ``load()`` returns None
when numba is not installed or ``MHA_CUPY_NUMBA=0`` is set, and the callers
then use NumPy's own operations.
"""

from __future__ import annotations

import functools
import os
import warnings
from types import SimpleNamespace

__all__ = ["load", "switched_off", "ENV_SWITCH"]

#: Environment variable that turns the compiled kernels off (``0``), read once per process.
ENV_SWITCH = "MHA_CUPY_NUMBA"


def switched_off() -> bool:
    """Whether ``MHA_CUPY_NUMBA`` turns the compiled kernels off (``0``, ``false``, ``no``, ``off``)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off")


@functools.cache
def load() -> SimpleNamespace | None:
    """The compiled kernels, or None without numba (or with ``MHA_CUPY_NUMBA=0``)."""
    if switched_off():
        return None
    try:
        return _build()
    except ImportError:  # numba is an optional extra (`fast`)
        return None
    except Exception as exc:  # noqa: BLE001 - e.g. numba finds no writable cache location: run without
        warnings.warn(f"mha_cupy runs without its compiled kernels: numba failed to load them ({exc!r}); set "
                      f"NUMBA_CACHE_DIR to a writable folder, or {ENV_SWITCH}=0 to silence this", RuntimeWarning,
                      stacklevel=2)
        return None


def _build() -> SimpleNamespace:
    import numba

    from . import _numba_kernels as k

    return SimpleNamespace(softmax_chunk=k.softmax_chunk, matmul_fixed=k.matmul_fixed, attend_chunk=k.attend_chunk,
                           version=numba.__version__)
