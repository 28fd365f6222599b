"""The TabPFN 9 guide's snippet runs as written.

The snippet (the first ```python block of docs/guide/tabpfn9.md) is run verbatim, in a fresh interpreter, with a
random-weight TabPFN-3.5 standing in for the real weights the way that page tells offline
users to: the file under TabPFN's default file name in a folder that ``TABPFN_MODEL_CACHE_DIR`` names (TabPFN's
own setting), so ``TabPFNClassifier()`` loads it and downloads nothing.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from checkpoints import write_checkpoint
from tabpfn.model_loading import ModelSource

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "guide" / "tabpfn9.md"


def page_snippet(page: str) -> str:
    """The first ```python block of ``page`` (ValueError when there is none)."""
    start = page.find("```python\n")
    end = page.find("\n```", start + 1)
    if start < 0 or end < 0:
        msg = f"{PAGE.name} has no ```python block"
        raise ValueError(msg)
    return page[start + len("```python\n"):end + 1]


def test_the_page_names_tabpfns_default_file():
    assert ModelSource.get_v3_5().default_filename in PAGE.read_text()


def test_the_page_snippet_runs(tmp_path):
    snippet = page_snippet(PAGE.read_text())
    assert "TabPFNClassifier(" in snippet and "X_train" in snippet  # the block found is the estimator's
    cache = tmp_path / "tabpfn-cache"
    write_checkpoint(cache / ModelSource.get_v3_5().default_filename, "v3.5")
    (tmp_path / "snippet.py").write_text(snippet)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TABPFN_")}
    env.update(TABPFN_MODEL_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    done = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = ast.literal_eval(done.stdout.strip().splitlines()[-1])  # print(mha_cupy.tabpfn.stats())
    assert counts["taken"] == 0 and counts["declined"]["fewer than 8192 keys (training rows)"] > 0
    assert "ran without mha_cupy taking any attention call" in done.stderr  # register()'s one warning
