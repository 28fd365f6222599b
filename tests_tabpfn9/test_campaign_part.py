"""The GPU campaign's tabpfn9 part on this CPU (``benchmarks/gpu/campaign.sh --dry-run --only tabpfn9``): it needs
tabpfn 9, so it runs here rather than in the main suite's dry run (tests/test_campaign.py), which skips it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_of_the_tabpfn9_part(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "campaign.sh"), "--dry-run", "--only", "tabpfn9",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
                          check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["parts"]["tabpfn9"]["status"] == "ok", report["parts"]
    assert report["tabpfn9"]["ok"] is True and report["tabpfn9"]["complete"] is True
    assert {(c["model"], c["side"]) for c in report["tabpfn9"]["cases"] if c.get("kind") == "check"} >= {
        ("v3.5", "tabpfn"), ("v3.5", "cupy"), ("v3.5", "torch"), ("v3", "tabpfn")}
    assert "tabpfn9.log" in {p.name for p in tmp_path.iterdir()}
