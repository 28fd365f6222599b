"""mha_cupy.compare: every figure checked against values worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mha_cupy
from helpers import require


def test_errors_of_a_known_difference(backend):
    ref = np.array([[1.0, -4.0], [0.5, 2.0]])
    actual = backend.asarray(ref + np.array([[0.0, 2e-11], [-3e-11, 0.0]]))
    c = mha_cupy.compare(actual, ref)
    assert c.max_abs_error == pytest.approx(3e-11, rel=1e-4)
    assert c.worst_index == (1, 0)
    assert c.max_rel_error == pytest.approx(6e-11, rel=1e-4)  # 3e-11 / 0.5
    assert c.scaled_error == pytest.approx(3e-11 / 4, rel=1e-4)
    assert (c.scale, c.rtol, c.atol, c.tolerance, c.precision) == (4.0, 1e-10, 0.0, 1e-10, "float64")
    assert c.ok and c.shape == (2, 2)


def test_fails_beyond_the_tolerance_and_atol_adds_to_it():
    ref = np.array([2.0, 3.0])
    c = mha_cupy.compare(ref + [0.0, 1e-9], ref)
    assert not c.ok and str(c).startswith("FAIL: scaled error 3.33e-10 > 1.0e-10")
    loose = mha_cupy.compare(ref + [0.0, 1e-9], ref, atol=1e-9)
    assert loose.ok and loose.tolerance == pytest.approx(1e-10 + 1e-9 / 3)


def test_ulps_count_the_floats_between_in_the_lower_precision():
    one = np.float32(1.0)
    three_up = np.nextafter(np.nextafter(np.nextafter(one, np.float32(2)), np.float32(2)), np.float32(2))
    c = mha_cupy.compare(np.array([three_up], np.float32), np.array([1.0]))
    assert c.precision == "float32" and c.ulp_error == 3.0
    tiny = np.nextafter(np.float32(0), np.float32(1))
    assert mha_cupy.compare(np.array([tiny], np.float32), np.array([-tiny], np.float32)).ulp_error == 2.0
    assert mha_cupy.compare(np.array([-0.0]), np.array([0.0])).ulp_error == 0.0
    half = mha_cupy.compare(np.array([1.0 + 2.0**-9], np.float16), np.array([1.0]))
    assert (half.precision, half.ulp_error, half.tolerance) == ("float16", 2.0, 2 * 2.0**-10)


def test_bfloat16_ulps():
    torch = require("torch")
    c = mha_cupy.compare(torch.tensor([1.0 + 2.0**-6], dtype=torch.bfloat16), np.array([1.0], np.float32))
    assert (c.precision, c.ulp_error, c.actual_dtype) == ("bfloat16", 2.0, "bfloat16")


def test_nans_and_infinities():
    c = mha_cupy.compare(np.array([1.0, np.nan]), np.array([1.0, 1.0]))
    assert not c.ok and c.max_abs_error == np.inf and c.worst_index == (1,) and c.ulp_error == np.inf
    assert not mha_cupy.compare(np.array([np.nan]), np.array([np.nan])).ok
    same_inf = mha_cupy.compare(np.array([np.inf, 2.0]), np.array([np.inf, 2.0]))
    assert same_inf.ok and same_inf.max_abs_error == 0.0 and same_inf.scale == 2.0
    assert not mha_cupy.compare(np.array([np.inf]), np.array([-np.inf])).ok


def test_empty_arrays_compare_equal():
    c = mha_cupy.compare(np.zeros((0, 3)), np.zeros((0, 3)))
    assert c.ok and c.max_abs_error == 0.0 and c.worst_index == ()


def test_str_is_one_line_and_to_dict_is_json():
    c = mha_cupy.compare(np.array([1.0, 2.0], np.float32), np.array([1.0, 2.0 + 1e-7]))
    assert "\n" not in str(c) and str(c).startswith("ok: scaled error")
    d = json.loads(json.dumps(c.to_dict()))
    assert d["worst_index"] == [1] and d["ok"] is True and d["precision"] == "float32"
    assert "both largest near zero" in str(c)
    same = str(mha_cupy.compare(np.array([1.0, 2.0]), np.array([1.0, 2.0])))
    assert "max rel 0.00e+00 and 0 ulp (float64); float64 vs float64 [2]" in same  # nothing to explain when equal


def test_arrays_of_two_libraries():
    xps = require("array_api_strict")
    a = xps.asarray([1.0, 2.0], dtype=xps.float32)
    c = mha_cupy.compare(a, np.array([1.0, 2.0]))
    assert c.ok and c.actual_dtype == "float32" and c.reference_dtype == "float64"


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(actual=np.zeros(3), reference=np.zeros((1, 3))), ValueError,
     r"one shape, got actual \(3,\) and reference \(1, 3\)"),
    (dict(actual=np.zeros(3, np.int64), reference=np.zeros(3)), TypeError, "actual must be a floating array.*int64"),
    (dict(actual=np.zeros(3), reference=[0.0, 0.0, 0.0]), TypeError, "reference must be an array"),
    (dict(actual=np.zeros(3), reference=np.zeros(3), rtol=-1.0), ValueError, "rtol must be a finite number >= 0, got -1.0"),
    (dict(actual=np.zeros(3), reference=np.zeros(3), atol=float("nan")), ValueError, "atol must be a finite number"),
])
def test_bad_arguments(kwargs, exc, match):
    actual, reference = kwargs.pop("actual"), kwargs.pop("reference")
    with pytest.raises(exc, match=match):
        mha_cupy.compare(actual, reference, **kwargs)
