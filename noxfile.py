"""The test environments: ``python -m nox`` runs both (the README's test command does; CI runs that).

- ``tests``: the main suite, in the environment nox itself runs in (the README's test extras, with tabpfn 2.2.1:
  the reference of everything else).
- ``tabpfn9``: a fresh virtual environment with tabpfn 9 and torch for ``mha_cupy.tabpfn`` (``tests_tabpfn9/``):
  tabpfn 9 cannot share an environment with tabpfn 2.2.1.
- ``lint``: ruff over the repository and mypy over the public modules (both configured in ``pyproject.toml``), in
  a virtual environment of its own.

Arguments after ``--`` go to pytest in the two test sessions, for example ``python -m nox -- -m "not slow"``.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests", "tabpfn9"]
nox.options.reuse_existing_virtualenvs = True

#: The linters, pinned: a new release may add findings, which should come with a change of these lines.
LINTERS = ("ruff==0.17.6", "mypy==2.4.1")
#: The tabpfn 9 environment: what ``mha_cupy.tabpfn`` is tested against.
TABPFN9 = ("tabpfn==9.2.0", "torch==2.13.0", "pytest>=8")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the package, tests, benchmarks and examples; mypy over the public modules."""
    session.install(*LINTERS)
    session.run("ruff", "check", ".")
    session.run("mypy")


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """The main suite, in the current environment."""
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def tabpfn9(session: nox.Session) -> None:
    """mha_cupy as TabPFN 9's attention backend, in an environment of its own."""
    session.install(".[fast]", *TABPFN9)
    session.run("python", "-m", "pytest", "tests_tabpfn9", *session.posargs)
