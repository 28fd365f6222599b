"""The GPU campaign's plumbing on this CPU (``benchmarks/gpu/campaign.sh --dry-run``): every part runs with NumPy
and torch CPU standing in for CuPy and CUDA, the report and logs land in one folder of at most 8 files, a part
past its time limit is stopped and reported while the others run, and bad arguments are refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CAMPAIGN = ROOT / "benchmarks" / "gpu" / "campaign.sh"
PARTS = ("machine", "install", "suite", "verify", "bench_layer", "bench_sdpa", "bench_few_query", "tabpfn9")


def campaign(*args: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    """Run the campaign in a process group of its own, all of which is killed if it outlasts ``timeout``."""
    full_env = {**os.environ, "PYTHON": sys.executable, **env}
    full_env.pop("OUT", None)
    with subprocess.Popen(["bash", str(CAMPAIGN), *args], cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_dry_run_runs_every_part_and_reports(tmp_path):
    pytest.importorskip("torch", reason="the dry run's torch side stands in for CUDA")
    pytest.importorskip("tabpfn", reason="the layer benchmark runs tabpfn 2.2.1's layer")
    done = campaign("--dry-run", "--out", str(tmp_path), timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dry_run"] is True
    assert list(report["parts"]) == list(PARTS)
    for part, v in report["parts"].items():
        # tabpfn 9 cannot share this environment with tabpfn 2.2.1: its part runs in tests_tabpfn9
        assert v["status"] in (("ok", "skipped") if part == "tabpfn9" else ("ok",)), (part, v)
    assert report["suite"]["backends"]["numpy"]["passed"] > 0
    assert report["suite"]["backends"]["numpy"]["failed"] == 0
    assert report["verify"]["failed"] == {"numpy": 0} and report["verify"]["checked"]["numpy"] > 0
    for section in ("layer", "sdpa", "few_query"):
        rows = report["bench"][section]["rows"]
        assert rows and not [r for r in rows if "error" in r or r.get("ok") is False], section
        assert any("time_ratio" in r for r in rows), section
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8, files
    assert {"report.json", "report.md", "suite.log", "bench.log"} <= set(files)
    assert "## Benchmark: sdpa" in (tmp_path / "report.md").read_text()
    assert done.stdout.strip().splitlines()[-1].startswith("campaign: 8 of 8 parts ok or skipped")


def test_a_part_past_its_limit_is_stopped_and_the_others_run(tmp_path):
    done = campaign("--dry-run", "--only", "machine,bench_few_query,verify", "--out", str(tmp_path), timeout=120,
                    CAMPAIGN_LIMIT_bench_few_query="2")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["parts"]["machine"]["status"] == "ok"
    assert report["parts"]["install"]["status"] == "ok"  # the benchmark needs it, so it ran
    assert report["parts"]["bench_few_query"]["status"] == "timeout"
    assert report["parts"]["verify"]["status"] == "ok"
    assert "suite" not in report["parts"]
    assert done.returncode == 1
    assert done.stdout.strip().splitlines()[-1].endswith("to rerun: --only bench_few_query")


def test_the_deadline_cuts_the_last_parts_short(tmp_path):
    """26 s in all: the machine part gets 11 s (26 less 15 for stopping and reporting), nothing after it starts."""
    done = campaign("--dry-run", "--only", "verify", "--out", str(tmp_path), timeout=60, CAMPAIGN_DEADLINE="26")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["parts"]["machine"]["limit_s"] <= 11
    assert report["parts"]["install"]["status"] == report["parts"]["verify"]["status"] == "deadline"
    assert done.returncode == 1


@pytest.mark.parametrize(("args", "env", "message"), [
    (("--only", "suite,gpu"), {}, "--only: unknown part 'gpu', expected some of: machine install suite"),
    (("--bogus",), {}, "unknown argument '--bogus'"),
    ((), {"CAMPAIGN_LIMIT_suite": "2.5"}, "CAMPAIGN_LIMIT_suite must be a whole number of seconds, got '2.5'"),
])
def test_bad_arguments_are_refused_before_anything_runs(tmp_path, args, env, message):
    done = campaign(*args, "--out", str(tmp_path / "out"), timeout=30, **env)
    assert done.returncode == 2
    assert message in done.stderr
    assert not (tmp_path / "out").exists()
