"""``mha_cupy.tabpfn`` in the main environment, where tabpfn is 2.2.1: importing it costs nothing, and registering
says what is missing. Its behaviour with tabpfn 9 is tested in ``tests_tabpfn9/`` (nox session ``tabpfn9``)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_import_pulls_in_neither_torch_nor_tabpfn():
    code = "import sys, mha_cupy.tabpfn; print(sorted(m for m in ('torch', 'tabpfn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_register_without_tabpfn9_names_what_to_install():
    pytest.importorskip("tabpfn", reason="tabpfn (2.2.1) is part of the main test environment")
    import mha_cupy.tabpfn

    try:
        import tabpfn.architectures.shared.attention_backends  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tabpfn 9 is installed here: tests_tabpfn9 covers registering")
    with pytest.raises(ImportError, match=r'pip install "tabpfn>=9"'):
        mha_cupy.tabpfn.register()


@pytest.mark.parametrize(("options", "error"), [({"policy": "all!"}, ValueError), ({"batch_invariant": "yes"}, TypeError),
                                                ({"memory_budget": -1}, ValueError)])
def test_bad_options_refused_before_importing_tabpfn(options, error):
    import mha_cupy.tabpfn

    with pytest.raises(error):
        mha_cupy.tabpfn.register(**options)
