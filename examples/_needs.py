"""What the examples share: their command line (the extra an example needs, said in its ``--help`` and in one line
before any work), figures, progress lines for the long steps, and their exit."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any


def epilog(extra: str) -> str:
    """The ``--help`` line naming the extra."""
    return f'needs the "{extra}" extra: python -m pip install ".[{extra}]"'


def command_line(doc: str | None, extra: str | None = None, *, needs: str | None = None, plot: bool = False,
                 quick: str = "small sizes (seconds; what the tests and the docs run)") -> argparse.ArgumentParser:
    """The example's parser, described by the first paragraph of its docstring after the title (``doc`` is empty
    where sphinx-gallery runs the example: the docstring became the page's text), with ``--quick`` (and ``--plot``
    for those that draw). Its help ends with what the example needs: the ``extra``, or ``needs`` in words."""
    p = argparse.ArgumentParser(description=_summary(doc), epilog=needs or (extra and epilog(extra)))
    p.add_argument("--quick", action="store_true", help=quick)
    if plot:
        p.add_argument("--plot", metavar="FILE.png", default=None,
                       help='save the figure there (needs matplotlib: python -m pip install ".[plot]")')
    return p


def _summary(doc: str | None) -> str:
    """The docstring's first paragraph after its title (the title is the gallery page's)."""
    paragraphs = [p for p in (doc or "").split("\n\n") if p.strip()]
    if paragraphs and set(paragraphs[0].splitlines()[-1].strip()) == {"="}:
        paragraphs = paragraphs[1:]
    return " ".join(paragraphs[0].split()) if paragraphs else ""


def pyplot(path: str | None) -> Any:
    """matplotlib's pyplot, or None where it is not installed. With ``--plot`` a missing matplotlib ends the run
    before any work, in one line."""
    if importlib.util.find_spec("matplotlib") is None:
        if path:
            sys.exit('--plot needs matplotlib (not installed): python -m pip install ".[plot]"')
        return None
    import matplotlib

    if path:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: str | None) -> None:
    """Write ``fig`` to ``path`` when given (``--plot``). The figure stays open: sphinx-gallery takes it into the
    page; a plain run without ``--plot`` draws it and leaves it."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        print(f"figure: {path}")


def require(extra: str, *modules: str) -> None:
    """Exit with one line naming the install command when one of ``modules`` is not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"{Path(sys.argv[0]).name} needs {', '.join(missing)} (not installed): "
                 f'python -m pip install ".[{extra}]"')


def step(what: str) -> None:
    """A progress line on stderr, at once (for a long step that has no parts to count)."""
    print(f"... {what}", file=sys.stderr, flush=True)


def finish(code: int) -> None:
    """Exit with ``code`` when it says a check failed; return quietly otherwise (an ``exit(0)`` would end a
    sphinx-gallery build)."""
    if code:
        sys.exit(code)
