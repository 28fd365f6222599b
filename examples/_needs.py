"""What the examples share: the extra an example needs, said in one line before any work (and in its ``--help``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def epilog(extra: str) -> str:
    """The ``--help`` line naming the extra."""
    return f'needs the "{extra}" extra: python -m pip install ".[{extra}]"'


def require(extra: str, *modules: str) -> None:
    """Exit with one line naming the install command when one of ``modules`` is not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"{Path(sys.argv[0]).name} needs {', '.join(missing)} (not installed): "
                 f'python -m pip install ".[{extra}]"')
