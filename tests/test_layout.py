"""The package's structure: no import cycles (imports inside functions included; ``if TYPE_CHECKING:`` blocks,
which never run, are not imports) and no module taking another module's private names, read with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mha_cupy"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level else []
    return ".".join([*base, *([node.module] if node.module else [])]) if node.level else (node.module or "")


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` outside ``if TYPE_CHECKING:`` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def _imports() -> dict[str, list[tuple[str, str]]]:
    """Module -> [(imported package module, name taken from it or "")], every import statement anywhere."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    found: dict[str, list[tuple[str, str]]] = {}
    for name, path in modules.items():
        edges = found.setdefault(name, [])
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges += [(a.name, "") for a in node.names if a.name.startswith("mha_cupy")]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(name, path.name == "__init__.py", node)
                if not target.startswith("mha_cupy"):
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    edges.append((sub, "") if sub in modules else (target, alias.name))
    return {m: [(t, n) for t, n in e if t in modules] for m, e in found.items()}


def test_no_import_cycles():
    graph = {m: sorted({t for t, _ in edges if t != m}) for m, edges in _imports().items()}
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = "open"
        path.append(m)
        for t in graph[m]:
            if state.get(t) == "open":
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(t):], t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m)


def test_no_module_takes_another_modules_private_names():
    foreign = [f"{m} imports {n} from {t}" for m, edges in _imports().items() for t, n in edges
               if n.startswith("_") and not n.startswith("__")]
    assert not foreign, "\n".join(foreign)


def test_readme_layout_lists_each_modules_imports():
    """The Layout table of the docs' development page names, for every module file, the package modules it
    imports."""
    page = (PACKAGE.parent / "docs" / "development.md").read_text()
    table = page[page.index("## Layout"):page.index("## Testing")]
    actual: dict[str, set[str]] = {}
    for module, edges in _imports().items():
        parts = module.split(".")
        if len(parts) == 2:  # a module right under mha_cupy
            actual[parts[1]] = {t.split(".")[1] for t, _ in edges if len(t.split(".")) > 1} - {parts[1]}
    rows, order = {}, []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            order.append(cells[0].strip("`").split(".py")[0].rstrip("/"))
            if cells[0].endswith(".py`"):
                rows[cells[0].strip("`")[:-3]] = cells[2]
    checked = 0
    for name, cell in rows.items():
        if name not in actual or not (cell.startswith("`") or cell == "nothing"):
            continue  # "all of the above", "everything above"
        listed = set() if cell == "nothing" else {c.strip().strip("`") for c in cell.split(",")}
        assert listed == actual[name], f"docs/development.md Layout row {name}.py lists {sorted(listed)}, imports {sorted(actual[name])}"
        below = [m for m in listed if order.index(m) > order.index(name)]
        assert not below, f"docs/development.md Layout: {name}.py imports {below}, listed below it (imports only go down the table)"
        checked += 1
    assert checked >= 15, rows
