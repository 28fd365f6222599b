"""The test environments: ``python -m nox`` runs them all (the README's test command does; CI runs that).

- ``tests``: the main suite, in the environment nox itself runs in (the README's test extras, with tabpfn 2.2.1:
  the reference of everything else).
- ``tabpfn9``: a fresh virtual environment with tabpfn 9 and torch for ``mha_cupy.tabpfn`` (``tests_tabpfn9/``):
  tabpfn 9 cannot share an environment with tabpfn 2.2.1.
- ``lint``: ruff over the repository and mypy over the public modules (both configured in ``pyproject.toml``), in
  a virtual environment of its own.
- ``docs``: the documentation site built with warnings as errors, its gallery executed, the docstrings' examples
  run as doctests, and two pages opened in headless Chromium (``docs/check_pages.py``), in a virtual environment
  with tabpfn 9 (for the TabPFN example).
- ``package``: the sdist and the wheel built (``python -m build``) and checked (``twine check``), then the wheel
  installed in a virtual environment of its own and the reference fixtures replayed from it (package data
  included), and the quickstart run on it.

Arguments after ``--`` go to pytest in the two test sessions, for example ``python -m nox -- -m "not slow"``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nox

nox.options.sessions = ["lint", "package", "docs", "tests", "tabpfn9"]
nox.options.reuse_existing_virtualenvs = True

#: The linters, pinned: a new release may add findings, which should come with a change of these lines.
LINTERS = ("ruff==0.17.6", "mypy==2.4.1")
#: What builds and checks the package.
PACKAGING = ("build>=1.2", "twine>=5")
#: The tabpfn 9 environment: what ``mha_cupy.tabpfn`` is tested against.
TABPFN9 = ("tabpfn==9.2.0", "torch==2.13.0", "pytest>=8")
#: What builds and checks the documentation, pinned like the linters (a new release may add warnings).
DOCS = ("sphinx==9.0.4", "pydata-sphinx-theme==0.24.0", "numpydoc==1.11.0", "sphinx-gallery==0.22.1",
        "myst-parser==5.2.0", "sphinx-argparse==0.6.1", "playwright==1.65.3")
#: The modules whose docstring examples run as doctests (the public API).
DOCTESTED = ("attention", "module", "comparison", "testing", "views", "weights", "_budget", "tabpfn")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the package, tests, benchmarks and examples; mypy over the public modules."""
    session.install(*LINTERS)
    session.run("ruff", "check", ".")
    session.run("mypy")


@nox.session
def package(session: nox.Session) -> None:
    """sdist and wheel built and checked; the installed wheel (not the source tree) replays the fixtures."""
    dist = Path(session.create_tmp()) / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    session.install(*PACKAGING)
    session.run("python", "-m", "build", "--outdir", str(dist), ".")
    wheels = sorted(dist.glob("*.whl"))
    session.run("twine", "check", "--strict", *map(str, sorted(dist.iterdir())))
    session.install(f"{wheels[0]}[test]")
    tests = str(Path("tests").resolve())
    quickstart = str(Path("examples", "quickstart.py").resolve())
    session.chdir(dist)  # away from the source tree, so that `import mha_cupy` finds the wheel
    session.run("python", "-c", "import mha_cupy, sys; assert 'site-packages' in mha_cupy.__file__, mha_cupy.__file__;"
                " print('installed wheel:', mha_cupy.__file__, mha_cupy.__version__)")
    session.run("pytest", "-q", "-p", "no:cacheprovider", f"{tests}/test_fixtures.py", "-k", "numpy or manifest",
                env={"MHA_CUPY_REQUIRE_ALL_BACKENDS": ""})
    session.run("python", quickstart)


@nox.session
def docs(session: nox.Session) -> None:
    """The site (``docs/_build/html``): docstring examples as doctests, then Sphinx with warnings as errors and the
    gallery executed (in the tabpfn 9 environment, which its TabPFN example needs), then the front page and a
    gallery page opened in headless Chromium."""
    session.install(".[fast,jax,dask,plot,progress]", "array-api-strict>=2.3", *TABPFN9, *DOCS)
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "--doctest-modules",
                *(f"mha_cupy/{name}.py" for name in DOCTESTED))
    out = Path("docs", "_build", "html")
    for stale in (out, Path("docs", "gallery")):  # sphinx-gallery skips examples it ran before, unchanged
        shutil.rmtree(stale, ignore_errors=True)
    session.run("python", "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "docs", str(out))
    session.run("python", "docs/check_pages.py", str(out))


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """The main suite, in the current environment."""
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def tabpfn9(session: nox.Session) -> None:
    """mha_cupy as TabPFN 9's attention backend, in an environment of its own."""
    session.install(".[fast]", *TABPFN9)
    session.run("python", "-m", "pytest", "tests_tabpfn9", *session.posargs)
