"""``register()`` without tabpfn 9: our ImportError naming tabpfn 9, whatever the installed tabpfn or its import
(scikit-learn's ``SCIPY_ARRAY_API`` RuntimeError, for one) does."""

from __future__ import annotations

import builtins
import importlib.metadata
from collections.abc import Iterator
from typing import Any

import pytest

import mha_cupy.tabpfn


@pytest.fixture
def fresh_registry() -> Iterator[None]:
    """``_registry`` looked up anew in the test, and again after it (with the real tabpfn 9)."""
    mha_cupy.tabpfn._registry.cache_clear()
    yield
    mha_cupy.tabpfn._registry.cache_clear()


def _refuse_import(error: Exception) -> Any:
    real = builtins.__import__

    def importing(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "tabpfn" or name.startswith("tabpfn."):
            raise error
        return real(name, *args, **kwargs)
    return importing


def test_tabpfn_2_is_refused_before_importing_it(fresh_registry, monkeypatch):
    """tabpfn 2.x is never imported: its import is where scikit-learn's RuntimeError came from."""
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.2.1" if name == "tabpfn" else real(name))
    monkeypatch.setattr(builtins, "__import__", _refuse_import(AssertionError("tabpfn was imported")))
    with pytest.raises(ImportError, match=r"needs tabpfn 9.*found tabpfn 2\.2\.1"):
        mha_cupy.tabpfn.register()


@pytest.mark.parametrize("error", [RuntimeError("scikit-learn: SCIPY_ARRAY_API=1 must be set before SciPy is "
                                                "imported"), ImportError("no module named tabpfn.architectures")])
def test_an_import_that_fails_is_our_import_error(error, fresh_registry, monkeypatch):
    monkeypatch.setattr(builtins, "__import__", _refuse_import(error))
    with pytest.raises(ImportError, match=r"needs tabpfn 9.*importing it failed") as raised:
        mha_cupy.tabpfn.register(policy="all")
    assert raised.value.__cause__ is error


def test_tabpfn_without_metadata_is_imported(fresh_registry, monkeypatch):
    """A tabpfn importable without installed metadata (a source checkout on the path): the import decides."""
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert mha_cupy.tabpfn._registry().__name__ == "tabpfn.architectures.shared.attention_backends"


def test_tabpfn_9_is_accepted(fresh_registry):
    assert int(importlib.metadata.version("tabpfn").split(".")[0]) >= 9
    assert mha_cupy.tabpfn._registry().__name__ == "tabpfn.architectures.shared.attention_backends"
