"""The ``mha-cupy`` command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from mha_cupy.cli import main

FIXTURES = Path(__file__).resolve().parent.parent / "mha_cupy" / "fixtures"


def test_verify_passes_on_the_fixtures(capsys):
    assert main(["verify", "--fixtures", str(FIXTURES), "--xp", "array_api_strict"]) == 0
    out = capsys.readouterr().out
    assert "basic_self_attn_small:output" in out and "0 failed" in out


def test_verify_fails_on_a_wrong_fixture(tmp_path, capsys):
    import json
    import shutil

    import numpy as np

    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    case = next(c for c in manifest["cases"] if c["case_id"] == "softmax_scale")
    manifest["cases"] = [case]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    data = dict(np.load(FIXTURES / case["filename"]))
    data["output"] = data["output"] + 1e-6  # beyond the float64 tolerance
    np.savez(tmp_path / case["filename"], **data)
    assert main(["verify", "--fixtures", str(tmp_path)]) == 1
    assert "FAIL" in capsys.readouterr().out
    shutil.rmtree(tmp_path)


def test_verify_without_manifest(tmp_path, capsys):
    assert main(["verify", "--fixtures", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_compare_backends(capsys):
    assert main(["compare", "--xp", "array_api_strict", "--length", "16"]) == 0
    assert "scaled max error" in capsys.readouterr().out


def test_bench_runs_small(capsys):
    assert main(["bench", "--q-len", "32", "--kv-len", "48", "--heads", "4", "--kv-heads", "2", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "mha_cupy (numpy)" in out and "median" in out


def test_unavailable_backend_exits_with_reason(capsys, monkeypatch):
    import sys
    import types

    fake = types.ModuleType("cupy")
    fake.is_available = lambda: False
    monkeypatch.setitem(sys.modules, "cupy", fake)
    assert main(["verify", "--xp", "cupy"]) == 2
    assert "no usable CUDA driver or GPU" in capsys.readouterr().err


def test_bad_command():
    with pytest.raises(SystemExit):
        main(["fly"])


def test_bench_refuses_heads_that_kv_heads_do_not_divide(capsys):
    assert main(["bench", "--heads", "6", "--kv-heads", "4", "--q-len", "8", "--kv-len", "8"]) == 2
    assert "--heads must be a multiple of --kv-heads, got --heads 6 --kv-heads 4" in capsys.readouterr().err


def test_bench_causal_with_different_lengths_compares_like_with_like(capsys):
    assert main(["bench", "--causal", "--q-len", "16", "--kv-len", "40", "--heads", "2", "--kv-heads", "1",
                 "--repeats", "1"]) == 0
    assert "outputs agree with torch's" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,match",
    [
        (["bench", "--q-len", "x"], "argument --q-len: invalid int value: 'x'"),
        (["bench", "--dtype", "int8"], "argument --dtype: invalid choice"),
        (["bench", "--xp", "tensorflow"], "argument --xp: invalid choice"),
        (["compare", "--xp", "numpy", "--nhead", "0"], "--nhead must be an int >= 1, got 0"),
        (["compare", "--xp", "numpy", "--emsize", "-4"], "--emsize must be an int >= 1, got -4"),
        (["bench", "--heads", "0", "--kv-heads", "0"], "--heads must be an int >= 1, got 0"),
        (["bench", "--repeats", "0", "--q-len", "4", "--kv-len", "4"], "--repeats must be an int >= 1, got 0"),
        (["bench", "--heads", "6", "--kv-heads", "0"], "--heads must be a multiple of --kv-heads"),
        (["verify", "--xp"], "argument --xp: expected one argument"),
    ],
)
def test_bad_options_exit_2_with_one_line(argv, match, capsys):
    import re

    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and re.search(match, err), err
    assert "Traceback" not in err


def test_verify_from_any_directory_uses_the_installed_fixtures(tmp_path):
    import subprocess
    import sys

    # -m from another folder: the installed package and its package data, not this checkout's files.
    run = subprocess.run([sys.executable, "-m", "mha_cupy", "verify", "--xp", "numpy"], cwd=tmp_path,
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 failed" in run.stdout and "basic_self_attn_small:output" in run.stdout


def test_version(capsys):
    from mha_cupy import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"mha-cupy {__version__}"
