"""mha_cupy.testing: assert_close refuses mismatched metadata before it looks at values."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import require
from mha_cupy.testing import TOLERANCE, assert_close, scaled_error, tolerance


def test_tolerances_by_dtype_of_any_library(backend):
    assert tolerance(backend.xp.float64) == 1e-10 == TOLERANCE["float64"]
    assert tolerance(backend.xp.float32) == 1e-5
    assert tolerance("float16") == 2 * 2.0**-10
    with pytest.raises(TypeError, match="dtype must be one of the floating dtypes"):
        tolerance("int8")


def test_scaled_error_is_relative_to_max_of_one_and_the_reference():
    assert scaled_error(np.array([1.5, 2.0]), np.array([1.0, 2.0])) == pytest.approx(0.25)
    assert scaled_error(np.array([0.1]), np.array([0.3])) == pytest.approx(0.2)
    assert scaled_error(np.zeros(0), np.zeros(0)) == 0.0


def test_passes_within_tolerance_and_fails_beyond(backend):
    a = backend.asarray(np.array([1.0, -2.0, 3.0]))
    assert assert_close(a, backend.asarray(np.array([1.0, -2.0, 3.0 + 1e-11]))) <= 1e-11
    with pytest.raises(AssertionError, match=r"max abs error 3\.000e-08 > 3\.000e-10"):
        assert_close(a, backend.asarray(np.array([1.0, -2.0, 3.0 + 3e-8])))
    assert_close(a, backend.asarray(np.array([1.0, -2.0, 3.0 + 3e-8])), rtol=1e-8)
    assert_close(a, backend.asarray(np.array([1.0, -2.0, 3.0 + 3e-8])), rtol=0.0, atol=4e-8)
    with pytest.raises(AssertionError):
        assert_close(a, backend.asarray(np.array([1.0, -2.0, np.nan])))


def test_metadata_mismatches_fail_before_values():
    xps = require("array_api_strict")
    a = np.arange(3.0)
    with pytest.raises(AssertionError, match="namespace numpy, desired array_api_strict"):
        assert_close(a, xps.asarray(a))
    with pytest.raises(AssertionError, match="device"):
        assert_close(xps.asarray(a), xps.asarray(a, device=xps.Device("device1")))
    with pytest.raises(AssertionError, match="dtype float64, desired float32"):
        assert_close(a, a.astype(np.float32))
    with pytest.raises(AssertionError, match=r"shape \(3,\), desired \(1, 3\)"):
        assert_close(a, a[None])
    with pytest.raises(TypeError, match="desired must be an array"):
        assert_close(a, [0.0, 1.0, 2.0])


def test_import_mha_cupy_is_enough_for_testing():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", "import mha_cupy; print(mha_cupy.testing.assert_close.__name__)"],
                         capture_output=True, text=True, check=False, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "assert_close", run.stderr
