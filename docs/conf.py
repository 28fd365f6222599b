"""Sphinx configuration of the mha_cupy documentation (``python -m nox -s docs`` builds it; see ``noxfile.py``).

Sphinx with the PyData theme and numpydoc, because our docstrings are numpydoc and our users read NumPy's, SciPy's
and CuPy's sites, built the same way; sphinx-gallery runs ``examples/`` at build time and keeps their figures;
myst-parser lets the user guide be Markdown; sphinx-argparse renders the command line from its parser.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout documented, as the doctests test it
sys.path.insert(0, str(ROOT / "examples"))  # the examples' shared `_needs` module
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gallery_helpers

import mha_cupy  # noqa: E402

project = "mha_cupy"
author = "the mha_cupy developers"
copyright = "2026, the mha_cupy developers"  # noqa: A001  Sphinx's name
version = release = mha_cupy.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
    "sphinxarg.ext",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "gallery/*.ipynb", "gallery/*.py", "gallery/*.md5", "gallery/*.zip",
                    "gallery/*.json", "gallery/*.pickle"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_typehints = "none"  # the numpydoc Parameters sections say the types, with shapes
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "gallery",
    # Every example but compare_with_torch.py runs: it needs tabpfn 2.2.1, which cannot share this environment
    # with the tabpfn 9 that tabpfn_backend.py needs (the tests run it in the reference environment).
    "filename_pattern": r"(?<!compare_with_torch)\.py$",
    "ignore_pattern": r"_needs\.py$",
    "reset_argv": "gallery_helpers.quick",
    "write_computation_times": False,  # its page loads scripts from CDNs, and the times say nothing to a user
    "within_subsection_order": "gallery_helpers.ExampleOrder",
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": True,
    "image_scrapers": ("matplotlib",),
    "matplotlib_animations": False,
    "show_memory": False,
    "min_reported_time": 1,
}

html_theme = "pydata_sphinx_theme"
html_title = f"mha_cupy {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
    "navbar_end": ["theme-switcher"],
}
html_context = {"default_mode": "auto"}  # without it the theme's script logs an error on a first visit
html_static_path = ["_static"]
html_favicon = "_static/favicon.svg"  # browsers ask for one; a missing one is a 404 on every page
html_show_sourcelink = False
