"""What ``docs/conf.py`` hands sphinx-gallery by name (a module, so that Sphinx can cache the configuration): the
examples' command line and their order on the gallery page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: The gallery's order: a first call, then the library's features, then the tools and the integrations.
ORDER = ("quickstart", "swap_backends", "kv_cache_streaming", "long_sequence_budget", "compare_backends_dtypes",
         "time_and_memory_vs_length", "compare_with_torch", "dask_scale_out", "tabpfn_backend")


def quick(gallery_conf: dict[str, Any], script_vars: dict[str, Any]) -> list[str]:
    """Every example runs at its small sizes, as the tests run it."""
    return ["--quick"]


class ExampleOrder:
    """sphinx-gallery's ``within_subsection_order``: ``ORDER``, then any other example by name."""

    def __init__(self, src_dir: str) -> None:
        self.src_dir = src_dir

    def __call__(self, filename: str) -> tuple[int, str]:
        stem = Path(filename).stem
        return (ORDER.index(stem) if stem in ORDER else len(ORDER), stem)

    def __repr__(self) -> str:
        return "<ExampleOrder>"
