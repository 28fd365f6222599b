"""The ``mha-cupy`` command line: every command, its JSON, its exit codes and its one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import require
from mha_cupy.cli import build_parser, main

FIXTURES = Path(__file__).resolve().parent.parent / "mha_cupy" / "fixtures"


def run_json(argv, capsys):
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def exit_code(argv):
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own refusals and --version
        return exc.code


# -- verify -----------------------------------------------------------------------------------------


def test_verify_passes_on_the_fixtures(capsys):
    assert main(["verify", "--fixtures", str(FIXTURES), "--xp", "array_api_strict", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "basic_self_attn_small:output" in out
    assert "array_api_strict: 58 passed, 0 failed" in out and "numpy: 58 passed, 0 failed" in out


def test_verify_json(capsys):
    code, data = run_json(["verify", "--xp", "numpy"], capsys)
    assert code == 0 and data["ok"] and data["failed"] == {"numpy": 0}
    row = data["results"]["numpy"][0]
    assert set(row) == {"case_id", "key", "dtype", "error", "tolerance", "ok"} and row["error"] <= row["tolerance"]


def _corrupted_fixture(tmp_path):
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    case = next(c for c in manifest["cases"] if c["case_id"] == "softmax_scale")
    manifest["cases"] = [case]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    data = dict(np.load(FIXTURES / case["filename"]))
    data["output"] = data["output"] + 1e-6  # beyond the float64 tolerance
    np.savez(tmp_path / case["filename"], **data)
    return tmp_path


def test_verify_fails_on_a_corrupted_fixture(tmp_path, capsys):
    assert main(["verify", "--fixtures", str(_corrupted_fixture(tmp_path)), "--xp", "numpy"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_verify_without_manifest(tmp_path, capsys):
    assert main(["verify", "--fixtures", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_verify_skips_unusable_backends_by_default_and_refuses_named_ones(monkeypatch, capsys):
    import types

    fake = types.ModuleType("cupy")
    fake.is_available = lambda: False
    fake.ndarray = type("ndarray", (), {})  # array-api-compat looks the type up in every loaded library
    monkeypatch.setitem(sys.modules, "cupy", fake)
    from mha_cupy.cli import _verify

    names, skipped = _verify._backends(None)
    assert "cupy" not in names and "numpy" in names and "no usable CUDA driver or GPU" in skipped["cupy"]
    assert main(["verify", "--xp", "cupy"]) == 2
    assert "no usable CUDA driver or GPU" in capsys.readouterr().err


@pytest.mark.parametrize("corrupt", [False, True])
def test_installed_command_from_any_directory(tmp_path, corrupt):
    # The installed package and its package data from another folder, not this checkout's files.
    (tmp_path / "f").mkdir()
    argv = ["verify", "--xp", "numpy"] + (["--fixtures", str(_corrupted_fixture(tmp_path / "f"))] if corrupt else [])
    run = subprocess.run([sys.executable, "-m", "mha_cupy", *argv], cwd=tmp_path, capture_output=True, text=True,
                         check=False)
    assert run.returncode == (1 if corrupt else 0), run.stdout + run.stderr
    assert ("numpy: 0 passed, 1 failed" if corrupt else "numpy: 58 passed, 0 failed") in run.stdout


# -- info -------------------------------------------------------------------------------------------


def test_info(capsys):
    code, data = run_json(["info"], capsys)
    assert code == 0 and data["packages"]["numpy"] == np.__version__
    assert data["backends"]["numpy"]["usable"] and data["backends"]["numpy"]["memory_budget"] == 32 * 2**20
    assert set(data["backends"]) >= {"numpy", "array_api_strict", "torch", "jax", "cupy", "dask"}
    for row in data["backends"].values():
        assert row["usable"] or row["reason"]
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "BLAS:" in out and re.search(r"^numpy\s+cpu\s+32\.0 MiB", out, re.M)
    numpy_row = data["backends"]["numpy"]
    assert numpy_row["simd"]["found"] == np.show_config(mode="dicts")["SIMD Extensions"]["found"]
    assert numpy_row["compiled_kernels"].startswith("numba " if "numba" in sys.modules else "none: numba is not")
    assert re.search(r"^NumPy: SIMD baseline \S+.*; compiled kernels: ", out, re.M)


def test_info_says_when_the_compiled_kernels_are_switched_off(tmp_path):
    env = {**os.environ, "MHA_CUPY_NUMBA": "0"}
    run = subprocess.run([sys.executable, "-m", "mha_cupy", "info", "--json"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env=env)
    assert json.loads(run.stdout)["backends"]["numpy"]["compiled_kernels"] == "off (MHA_CUPY_NUMBA=0)"


# -- compare ----------------------------------------------------------------------------------------


def test_compare_backends(capsys):
    code, data = run_json(["compare", "--xp", "array_api_strict", "--other", "numpy", "--length", "16",
                           "--dtype", "float64"], capsys)
    assert code == 0 and data["comparison"]["ok"] and data["comparison"]["scaled_error"] <= 1e-10
    assert data["comparison"]["shape"] == [2, 16, 64]


def test_compare_against_float64_and_its_tolerance_flags(capsys):
    assert main(["compare", "--against", "float64", "--length", "16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mha_cupy on numpy vs mha_cupy in float64 on numpy, float32") and "ok: scaled error" in out
    assert main(["compare", "--against", "float64", "--length", "16", "--rtol", "0"]) == 1
    assert "FAIL: scaled error" in capsys.readouterr().out


def test_compare_against_tabpfn(capsys):
    require("tabpfn")
    code, data = run_json(["compare", "--against", "tabpfn", "--length", "24", "--kv-share", "2",
                           "--save-peak-mem-factor", "2", "--add-input", "--allow-inplace"], capsys)
    assert code == 0 and data["reference"].startswith("tabpfn 2.2.1") and data["comparison"]["scaled_error"] <= 1e-5


def test_compare_against_torch_nn(capsys):
    require("torch")
    code, data = run_json(["compare", "--against", "torch-nn", "--dtype", "float64", "--length", "12",
                           "--kv-length", "20"], capsys)
    assert code == 0 and data["comparison"]["scaled_error"] <= 1e-10
    assert main(["compare", "--against", "torch-nn", "--kv-share", "2"]) == 2
    assert "torch.nn.MultiheadAttention has no equivalent of --kv-share" in capsys.readouterr().err


@pytest.mark.parametrize("reference", [["--against", "tabpfn"], ["--against", "torch-nn"], ["--against", "float64"],
                                       ["--other", "jax"]])
def test_compare_in_bfloat16(reference, capsys):
    require("torch")
    require("tabpfn" if "tabpfn" in reference else "jax" if "jax" in reference else "torch")
    argv = ["compare", "--xp", "torch", "--dtype", "bfloat16", "--length", "20", *reference]
    code, data = run_json(argv, capsys)
    c = data["comparison"]
    assert code == 0 and c["actual_dtype"] == "bfloat16" and c["tolerance"] == 2 * 2.0**-7, c
    assert c["reference_dtype"] == ("float64" if "float64" in reference else "bfloat16")
    assert c["scaled_error"] <= 2 * 2.0**-7
    if "float64" in reference:  # bfloat16 weights and inputs, computed in float64: only the arithmetic differs
        assert 0 < c["scaled_error"] <= 2e-3


def test_compare_and_bench_in_float64_switch_jax_to_x64(tmp_path):
    require("jax")
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}  # a fresh process, JAX's default: x64 off
    for argv in (["compare", "--xp", "jax", "--other", "numpy", "--dtype", "float64", "--length", "8"],
                 ["bench", "--xp", "jax", "--dtype", "float64", "--q-len", "16", "--repeats", "1", "--no-memory"]):
        run = subprocess.run([sys.executable, "-m", "mha_cupy", *argv, "--json"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=300, env=env)
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["exit_code"] == 0


@pytest.mark.parametrize("option", ["--xp", "--other"])
def test_compare_names_the_option_of_an_unusable_backend(option, monkeypatch, capsys):
    import types

    fake = types.ModuleType("cupy")
    fake.is_available = lambda: False
    fake.ndarray = type("ndarray", (), {})
    monkeypatch.setitem(sys.modules, "cupy", fake)
    assert main(["compare", option, "cupy", *(["--against", "float64"] if option == "--xp" else [])]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mha-cupy compare: {option} cupy: ") and "no usable CUDA driver or GPU" in err, err
    assert len(err.strip().splitlines()) == 1


def test_compare_against_float64_widens_the_bfloat16_values_the_side_holds(monkeypatch, capsys):
    require("torch")
    from mha_cupy import MultiHeadAttention

    seen = []
    real = MultiHeadAttention.__call__

    def spy(self, x, *args, **kwargs):
        seen.append((self, x))
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(MultiHeadAttention, "__call__", spy)
    assert main(["compare", "--xp", "torch", "--dtype", "bfloat16", "--length", "8", "--against", "float64"]) == 0
    (wide, x_wide), = [(layer, x) for layer, x in seen if layer.dtype == np.float64]
    for a in (x_wide, *wide.weights.present().values()):  # bfloat16 is float32's upper half: low 16 bits zero
        assert np.any(a != 0) and not np.any(np.asarray(a, dtype=np.float32).view(np.uint32) & 0xFFFF)


# -- bench ------------------------------------------------------------------------------------------


def test_bench_sweep_json_and_plot(tmp_path, capsys):
    require("torch")
    require("matplotlib")
    png = tmp_path / "bench.png"
    code, data = run_json(["bench", "--q-len", "32,64", "--kv-len", "48", "--heads", "4", "--kv-heads", "2",
                           "--repeats", "2", "--plot", str(png)], capsys)
    assert code == 0 and [(r["q_len"], r["kv_len"]) for r in data["rows"]] == [(32, 48), (64, 48)]
    row = data["rows"][0]
    assert row["agree"] and row["ours_s"] > 0 and row["torch_gflops"] > 0
    assert row["ours_peak_bytes"] >= 0 and row["torch_peak_bytes"] >= 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and data["plot"] == str(png)


def test_bench_causal_with_different_lengths_compares_like_with_like(capsys):
    require("torch")
    assert main(["bench", "--causal", "--q-len", "16", "--kv-len", "40", "--heads", "2", "--kv-heads", "1",
                 "--repeats", "1", "--no-memory"]) == 0
    assert re.search(r"^16\s+40\s", capsys.readouterr().out, re.M)


def test_bench_times_nothing_when_outputs_differ(monkeypatch, capsys):
    require("torch")
    from mha_cupy.cli import _bench

    real = _bench._callables

    def wrong(*args):
        ours, theirs = real(*args)
        return (lambda: ours() + 1e-3), theirs

    monkeypatch.setattr(_bench, "_callables", wrong)
    code, data = run_json(["bench", "--q-len", "8", "--repeats", "1", "--no-memory"], capsys)
    assert code == 1 and not data["rows"][0]["agree"] and "ours_s" not in data["rows"][0]


# -- the parser, errors and exit codes --------------------------------------------------------------


def test_every_option_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and "verify" in a.choices)
    for name, command in sub.choices.items():
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings} has no help text"
    assert "exit codes:" in parser.format_help()


@pytest.mark.parametrize(
    "argv,match",
    [
        (["bench", "--q-len", "x"], "argument --q-len: expected positive integers separated by commas, got 'x'"),
        (["bench", "--q-len", "0"], "argument --q-len: expected positive integers"),
        (["bench", "--dtype", "int8"], "argument --dtype: invalid choice"),
        (["bench", "--xp", "tensorflow"], "argument --xp: invalid choice"),
        (["bench", "--q-len", "1,2", "--kv-len", "3,4,5"], "--kv-len must give one length or one per --q-len"),
        (["compare", "--against", "float64", "--nhead", "0"], "--heads must be an int >= 1, got 0"),
        (["compare", "--against", "float64", "--emsize", "-4"], "--emsize must be an int >= 1, got -4"),
        (["compare", "--against", "float64", "--emsize", "10", "--nhead", "4"], "--emsize must be a multiple of --heads"),
        (["compare", "--against", "float64", "--save-peak-mem-factor", "2"], "needs allow_inplace=True"),
        (["compare", "--xp", "numpy"], "one of the arguments --other --against is required"),
        (["compare", "--dtype", "bfloat16", "--against", "float64"],
         r"--dtype bfloat16 needs a backend that has it \(torch, jax\), got --xp numpy with float16, float32"),
        (["compare", "--dtype", "float16", "--against", "tabpfn"], "float64, float32 or bfloat16, got --dtype float16"),
        (["compare", "--against", "float64", "--rtol", "-1"], "rtol must be a finite number >= 0, got -1.0"),
        (["bench", "--heads", "0", "--kv-heads", "0"], "--heads must be an int >= 1, got 0"),
        (["bench", "--repeats", "0", "--q-len", "4", "--kv-len", "4"], "--repeats must be an int >= 1, got 0"),
        (["bench", "--heads", "6", "--kv-heads", "4"], "--heads must be a multiple of --kv-heads, got --heads 6"),
        (["verify", "--xp"], "argument --xp: expected at least one argument"),
        (["fly"], "argument COMMAND: invalid choice: 'fly'"),
    ],
)
def test_bad_options_exit_2_with_one_line(argv, match, capsys):
    code = exit_code(argv)
    err = capsys.readouterr().err
    assert code == 2 and re.search(match, err), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_usage_errors_point_to_the_commands_own_help(capsys):
    assert main(["compare", "--lenght", "5", "--against", "float64"]) == 2
    assert capsys.readouterr().err.strip() == ("mha-cupy compare: unrecognized arguments: --lenght 5; did you mean "
                                               "--length for --lenght? (see `mha-cupy compare --help`)")
    assert main(["bench", "--qlen", "5", "--zzz"]) == 2
    assert "arguments: --qlen 5 --zzz; did you mean --q-len for --qlen? (see" in capsys.readouterr().err
    assert main(["fly"]) == 2
    assert "(see `mha-cupy --help`)" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["bench", "--q-len", "abc"], ["compare", "--length", "abc", "--against", "float64"],
                                  ["verify", "--no-such-option"], ["fly"]])
def test_usage_errors_in_json_mode_are_one_json_object(argv, capsys):
    code = main([*argv, "--json"])
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert code == 2 and data["exit_code"] == 2 and "error" in data and len(captured.err.strip().splitlines()) == 1
    assert data["command"] == (argv[0] if argv[0] != "fly" else None)


def test_verify_reports_each_backend_as_it_finishes(tmp_path):
    """A line per backend on stderr as soon as it is done (flushed), before the table on stdout."""
    proc = subprocess.Popen([sys.executable, "-m", "mha_cupy", "verify", "--xp", "numpy", "array_api_strict"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stderr.readline()  # arrives while array_api_strict still runs: stdout is still empty
    assert re.match(r"verify: numpy: \d+ passed, 0 failed \(\d+\.\d s\)", first), first
    out, rest = proc.communicate(timeout=300)
    assert proc.returncode == 0 and re.match(r"verify: array_api_strict: \d+ passed, 0 failed", rest), rest
    assert "fixture:array" in out


def test_errors_in_json_mode_are_json_too(capsys):
    code, data = run_json(["compare", "--against", "float64", "--nhead", "0"], capsys)
    assert code == 2 and data == {"command": "compare", "exit_code": 2, "error": "--heads must be an int >= 1, got 0"}


def test_version(capsys):
    from mha_cupy import __version__

    assert exit_code(["--version"]) == 0 and capsys.readouterr().out.strip() == f"mha-cupy {__version__}"


@pytest.mark.parametrize("against", ["float64", "tabpfn"])
def test_compare_head_sizes_need_not_divide_emsize(against, capsys):
    if against == "tabpfn":
        require("tabpfn")
    emsize = "30" if against == "float64" else "32"  # tabpfn's config wants emsize divisible by nhead
    argv = ["compare", "--against", against, "--emsize", emsize, "--nhead", "4", "--d-k", "6", "--d-v", "5",
            "--kv-heads", "2", "--length", "16"]
    code, data = run_json(argv, capsys)
    assert code == 0 and data["comparison"]["ok"]
    assert main(argv) == 0 and f"E={emsize} N=4 K=2 H=6 V=5" in capsys.readouterr().out


def test_tabpfns_own_refusal_is_one_line(capsys):
    require("tabpfn")
    argv = ["compare", "--against", "tabpfn", "--emsize", "30", "--nhead", "4", "--d-k", "6", "--d-v", "6"]
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "emsize must be divisible by nhead" in err, err


@pytest.mark.parametrize(("argv", "match"), [
    (["--kv-heads", "3"], "--heads must be a multiple of --kv-heads"),
    (["--kv-heads", "2", "--kv-share", "2"], "give --kv-heads or --kv-share"),
    (["--emsize", "30"], "or give the head sizes with --head-dim and --d-v"),
    (["--d-k", "0"], "--head-dim must be an int >= 1, got 0"),
])
def test_compare_head_size_refusals(argv, match, capsys):
    assert exit_code(["compare", "--against", "float64", *argv]) == 2
    assert re.search(match, capsys.readouterr().err)


@pytest.mark.parametrize(("xp", "dtype"), [("numpy", "float16"), ("torch", "bfloat16"), ("jax", "bfloat16"), ("numpy", "float64")])
def test_bench_takes_every_dtype_its_backend_has(xp, dtype, capsys):
    require("torch")
    code, data = run_json(["bench", "--xp", xp, "--dtype", dtype, "--q-len", "24", "--heads", "2", "--kv-heads", "1", "--repeats", "1",
                           "--no-memory"], capsys)
    comparison = data["rows"][0]["comparison"]
    assert code == 0 and data["config"]["dtype"] == dtype
    assert comparison["precision"] == comparison["reference_dtype"] == dtype and comparison["ok"]


def test_bench_refuses_a_dtype_its_backend_lacks_before_any_work(capsys):
    code, data = run_json(["bench", "--xp", "numpy", "--dtype", "bfloat16", "--q-len", "8"], capsys)
    assert code == 2 and "--dtype bfloat16 needs a backend that has it, got --xp numpy" in data["error"]
    assert "rows" not in data  # nothing measured


def test_bench_kv_heads_default_to_the_heads(capsys):
    require("torch")
    code, data = run_json(["bench", "--q-len", "16", "--heads", "2", "--repeats", "1", "--no-memory"], capsys)
    assert code == 0 and data["config"]["kv_heads"] == 2 and data["rows"][0]["agree"]


def test_verify_xp_repeated_runs_each(capsys):
    require("array_api_strict")
    code, data = run_json(["verify", "--xp", "numpy", "--xp", "array_api_strict"], capsys)
    assert code == 0 and data["failed"] == {"numpy": 0, "array_api_strict": 0}


def test_bench_plot_without_memory_draws_time_alone(tmp_path, capsys):
    require("torch")
    require("matplotlib")
    import warnings

    png = tmp_path / "time.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels" for an empty memory panel
        code, data = run_json(["bench", "--q-len", "16,32", "--heads", "2", "--repeats", "1", "--no-memory",
                               "--plot", str(png)], capsys)
    assert code == 0 and png.read_bytes()[:4] == b"\x89PNG"
    import matplotlib.image

    height, width = matplotlib.image.imread(png).shape[:2]
    assert width < 1.5 * height  # one panel, not two
