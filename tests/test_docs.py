"""The documentation against the code: every public name in the API reference, and the promises the README, the
user guide and the docstrings make in more than one place saying the same thing (the site itself is built and
checked by the ``docs`` nox session)."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import mha_cupy
from mha_cupy._backends import BACKEND_NAMES
from mha_cupy.comparison import TOLERANCE

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text()
GUIDE = {p.stem: p.read_text() for p in (DOCS / "guide").glob("*.md")}


def _all_of(module: str) -> list[str]:
    """A module's ``__all__``, read from its source."""
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError(f"{module} has no __all__")


def _documented() -> set[str]:
    """``module.name`` of every ``auto*`` directive in the API reference."""
    found = set()
    for page in (DOCS / "api").glob("*.rst"):
        module = None
        for line in page.read_text().splitlines():
            if line.startswith(".. currentmodule:: "):
                module = line.split(":: ")[1].strip()
            m = re.match(r"\.\. auto(?:function|class|data|exception):: (\w+)", line)
            if m:
                found.add(f"{module}.{m.group(1)}")
    return found


PUBLIC_MODULES = sorted(p.stem for p in (ROOT / "mha_cupy").glob("*.py") if not p.stem.startswith("_"))


@pytest.mark.parametrize("module", ["__init__", *PUBLIC_MODULES])
def test_every_public_name_is_in_the_api_reference(module):
    """Each name of a public module's ``__all__`` has an entry, under its module or under another public module
    (or the package) that exports it too."""
    exporters = {m: set(_all_of(f"mha_cupy/{m}")) for m in ["__init__", *PUBLIC_MODULES]}
    documented = _documented()

    def has_entry(name: str) -> bool:
        return any(f"mha_cupy.{'' if m == '__init__' else m + '.'}{name}" in documented
                   for m, names in exporters.items() if name in names)

    missing = [n for n in exporters[module] if not has_entry(n)]
    assert not missing, f"mha_cupy/{module}.py: no API reference entry for {missing}"
    assert PUBLIC_MODULES == ["attention", "comparison", "dropout", "module", "tabpfn", "testing", "views", "weights"]


def test_every_guide_page_is_in_the_guide_toctree():
    toctree = (DOCS / "guide" / "index.md").read_text()
    assert {name for name in GUIDE if name != "index"} <= set(toctree.split())


def _table_signature(name: str) -> dict[str, str]:
    """Keyword -> default of the API table's row for ``name(`` in the usage guide."""
    row = next(line for line in GUIDE["usage"].splitlines() if line.startswith(f"| `{name}("))
    args = row.split("(", 1)[1].split(")`", 1)[0]
    out = {}
    for part in (p.strip() for p in args.split(",")):
        if part and part != "*":
            key, _, default = part.partition("=")
            out[key] = default
    return out


@pytest.mark.parametrize("func", [mha_cupy.scaled_dot_product_attention, mha_cupy.scaled_dot_product_attention_vjp,
                                  mha_cupy.MultiHeadAttention])
def test_the_api_table_gives_each_signature_as_the_code_has_it(func):
    table = _table_signature(func.__name__)
    params = {n: p for n, p in inspect.signature(func).parameters.items() if n != "self"}
    assert list(table) == list(params), func.__name__
    for name, p in params.items():
        if p.default is not inspect.Parameter.empty and name != "dtype":  # dtype: numpy.float32 in words
            assert table[name] == repr(p.default), (func.__name__, name, table[name], p.default)


def test_every_backend_name_is_where_xp_is_documented():
    layer_xp = inspect.getdoc(mha_cupy.MultiHeadAttention).split("xp :")[1].split("device :")[0]
    usage = GUIDE["usage"]
    for name in BACKEND_NAMES:
        assert f'"{name}"' in layer_xp, name
        assert f'`"{name}"`' in usage, name


def test_tolerances_are_stated_as_the_table_has_them():
    words = {"float64": "1e-10", "float32": "1e-5", "float16": "2⁻⁹", "bfloat16": "2⁻⁶"}
    values = {"1e-10": 1e-10, "1e-5": 1e-5, "2⁻⁹": 2**-9, "2⁻⁶": 2**-6}
    assert {name: values[w] for name, w in words.items()} == {k: TOLERANCE[k] for k in words}
    stated = ", ".join(f"{name} {w}" for name, w in words.items())
    assert stated in GUIDE["usage"]
    assert "float64 within 1e-10" in README and "float32 within 1e-5" in README


def test_the_default_memory_budget_is_the_one_stated():
    mib = mha_cupy.get_memory_budget() // 2**20
    assert f"{mib} MiB on CPUs" in inspect.getdoc(mha_cupy.scaled_dot_product_attention)
    assert f"{mib} MiB on CPUs" in README
    assert f"{mib} MiB on CPUs" in inspect.getdoc(mha_cupy.get_memory_budget)


def test_batch_invariance_is_promised_alike():
    doc = " ".join(inspect.getdoc(mha_cupy.scaled_dot_product_attention).split("batch_invariant :")[1]
                   .split("k_scale, v_scale")[0].split())
    cost = re.search(r"×\d\.\d-\d\.\d", doc).group()
    assert f"costs {cost} on NumPy" in README
    assert "on the same machine and library versions" in doc  # and nowhere a wider promise
    options = " ".join(GUIDE["options"].split())
    assert "What is promised**: the same machine, the same library versions," in options
    layer = " ".join(inspect.getdoc(mha_cupy.MultiHeadAttention.__call__).split())
    assert "on the same machine and library versions" in layer
