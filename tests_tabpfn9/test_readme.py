"""The README's TabPFN 9 snippet runs as written.

The snippet (the first ```python block after "## Use with TabPFN 9" in README.md) is run verbatim, in a fresh
interpreter, with a random-weight TabPFN-3.5 standing in for the real weights the way the README tells offline
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
SECTION = "## Use with TabPFN 9"


def readme_snippet(readme: str) -> str:
    """The first ```python block after ``SECTION`` (ValueError when there is none)."""
    start = readme.find("```python\n", readme.index(SECTION))
    end = readme.find("\n```", start + 1)
    if start < 0 or end < 0:
        msg = f"README.md has no ```python block after {SECTION!r}"
        raise ValueError(msg)
    return readme[start + len("```python\n"):end + 1]


def test_docs_name_tabpfns_default_file():
    assert ModelSource.get_v3_5().default_filename in (ROOT / "docs" / "guide" / "tabpfn9.md").read_text()


def test_readme_snippet_runs(tmp_path):
    snippet = readme_snippet((ROOT / "README.md").read_text())
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
