"""The bitwise and batch-invariance tests again, with NumPy (and numba) held to AVX2 on a CPU with AVX-512:
what an ordinary AVX2 machine runs (``NPY_DISABLE_CPU_FEATURES``, in a subprocess). OpenBLAS keeps the
core the machine gives it: its settings are never changed here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mha_cupy._backends._dispatch import numpy_simd, without_avx512

HERE = Path(__file__).resolve().parent
#: Tests whose promises are bitwise (batch invariance, the dropout mask, the fixed-order product) or rest on
#: the compiled kernels' accuracy.
BITWISE = ("test_batch_invariant.py", "test_numba.py", "test_dropout.py", "test_random.py", "test_edge_cases.py")


@pytest.mark.slow
def test_bitwise_promises_hold_with_avx2_dispatch():
    settings = without_avx512()
    if not settings:
        pytest.skip(f"this CPU has no AVX-512 targets ({numpy_simd()}): the suite itself ran with AVX2 dispatch")
    env = {**os.environ, **settings}
    probe = "from mha_cupy._backends._dispatch import numpy_simd; print(numpy_simd())"
    simd = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert "AVX512" not in simd and "X86_V4" not in simd, simd
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *BITWISE], cwd=HERE, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout.splitlines()[-1]
