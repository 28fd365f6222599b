"""The command line sphinx-gallery gives each example (named by ``docs/conf.py``; a module, so that Sphinx can
cache the configuration)."""

from __future__ import annotations

from typing import Any


def quick(gallery_conf: dict[str, Any], script_vars: dict[str, Any]) -> list[str]:
    """Every example runs at its small sizes, as the tests run it."""
    return ["--quick"]
