"""Every example runs, at small sizes, from outside the checkout, and exits 0 (each checks its own numbers)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import require

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NEEDS = {"compare_with_torch.py": ("torch", "tabpfn"), "dask_scale_out.py": ("dask.array", "distributed")}


#: Examples run by the tests of another environment (nox session tabpfn9: tabpfn 9 cannot live beside tabpfn 2.2.1).
ELSEWHERE = {"tabpfn_backend.py": "tests_tabpfn9/test_tabpfn.py::test_example_runs"}


def test_every_example_is_listed_here_and_documented():
    names = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))  # _needs.py: shared
    assert names == sorted({**CASES, **ELSEWHERE})
    root = EXAMPLES.parent
    for test in ELSEWHERE.values():
        path, name = test.split("::")
        assert f"def {name}(" in (root / path).read_text()
    for name in names:
        text = (EXAMPLES / name).read_text()
        assert text.startswith('"""') and "Run: ``python examples/" in text, name


CASES = {"quickstart.py": ["--quick"], "swap_backends.py": ["--quick"], "compare_with_torch.py": ["--quick"],
         "kv_cache_streaming.py": ["--quick"], "long_sequence_budget.py": ["--quick"],
         "compare_backends_dtypes.py": ["--quick"], "dask_scale_out.py": ["--quick"],
         "time_and_memory_vs_length.py": ["--quick"]}


@pytest.mark.parametrize("name", sorted(CASES))
def test_help_works_and_names_the_extra(name, tmp_path):
    """``--help`` needs nothing beyond the library, and an example that needs an extra says which."""
    run = subprocess.run([sys.executable, str(EXAMPLES / name), "--help"], cwd=tmp_path, capture_output=True,
                         text=True, check=False, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "--quick" in run.stdout, run.stdout  # what the tests and the docs' gallery run
    if name in NEEDS:
        assert 'python -m pip install ".[' in run.stdout, run.stdout


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_runs(name, tmp_path):
    for module in NEEDS.get(name, ()):
        require(module)
    run = subprocess.run([sys.executable, str(EXAMPLES / name), *CASES[name]], cwd=tmp_path, capture_output=True,
                         text=True, check=False, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ok" in run.stdout.lower()


def test_tabpfn_backend_example_says_in_one_line_what_it_needs(tmp_path):
    require("tabpfn")  # the main environment's tabpfn 2.2.1: not the tabpfn 9 the example needs
    run = subprocess.run([sys.executable, str(EXAMPLES / "tabpfn_backend.py"), "--quick"], cwd=tmp_path,
                         capture_output=True, text=True, check=False, timeout=300)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "needs tabpfn 9 and torch" in run.stderr and 'pip install "tabpfn>=9"' in run.stderr


def _readme_usage_block() -> str:
    readme = (EXAMPLES.parent / "README.md").read_text()
    return readme.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_usage_block_runs_as_written(tmp_path):
    """Pasted as it stands, in a fresh interpreter: on a machine without a usable GPU it says so and stays on
    the CPU; with one, it compares CuPy with NumPy."""
    code = _readme_usage_block()
    assert 'layer.to("cupy")' in code
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1].startswith("ok")
    from helpers import cupy_skip_reason

    assert ("CuPy is not usable here" in run.stdout) == (cupy_skip_reason() is not None)


def test_readme_usage_block_runs_on_another_library():
    # The GPU line pointed at a CPU library CI has that refuses host conversion like CuPy does.
    require("array_api_strict")
    code = _readme_usage_block().replace('"cupy"', '"array_api_strict"')
    exec(compile(code, "README.md", "exec"), {})
