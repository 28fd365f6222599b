"""The GPU campaign's bookkeeping (``benchmarks/gpu/campaign.sh`` calls it; standard library only, plus what
each subcommand inspects):

    python benchmarks/gpu/report.py machine OUT.json [--dry-run]   what the machine is, printed and saved
    python benchmarks/gpu/report.py suite JUNIT.xml OUT.json       pytest's counts per backend and every failure
    python benchmarks/gpu/report.py report WORK OUTDIR [--dry-run] report.json, report.md and the logs into OUTDIR
                                                                   (8 files at most), the summary printed last
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

#: What the device tool brings back: at most 8 files, 16 MiB each.
MAX_FILES = 8
MAX_LOG_BYTES = 4 * 2**20
#: Part name -> the log file it goes to in OUTDIR (the benchmark parts share one).
LOGS = {"machine": "machine.log", "install": "install.log", "suite": "suite.log", "verify": "verify.log",
        "bench_layer": "bench.log", "bench_sdpa": "bench.log", "bench_few_query": "bench.log", "tabpfn9": "tabpfn9.log"}
PARTS = tuple(LOGS)
#: The test ids of the suite's GPU cases, and what stands in for them in a dry run.
SUITE_BACKENDS = ("cupy", "torch-cuda", "jax-gpu", "numpy")


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception as exc:  # noqa: BLE001 - a broken install is what this reports
        return None if isinstance(exc, ImportError) else f"import failed: {exc}"
    return getattr(mod, "__version__", "?")


def machine(out: Path, dry_run: bool) -> dict:
    """GPU name, driver, CUDA, and the versions of every library the campaign uses."""
    info: dict[str, Any] = {"dry_run": dry_run, "python": platform.python_version(), "platform": platform.platform(),
                            "cpu": _cpu(), "versions": {m: _version(m) for m in
                                                        ("numpy", "cupy", "torch", "jax", "numba", "ml_dtypes",
                                                         "scipy", "sklearn", "array_api_compat", "pytest", "xdist",
                                                         "pytest_timeout", "hypothesis")}}
    try:
        import torch

        info["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                           "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count}
    except ImportError:
        pass
    try:
        import cupy

        info["cupy_available"] = bool(cupy.is_available())
        if info["cupy_available"]:
            info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
            info["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
            cupy.show_config()
    except Exception as exc:  # noqa: BLE001
        info["cupy_error"] = f"{type(exc).__name__}: {exc}"
    try:
        import jax

        info["jax_devices"] = [str(d) for d in jax.devices()]
    except Exception as exc:  # noqa: BLE001
        info["jax_error"] = f"{type(exc).__name__}: {exc}"
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, check=False) if _which("nvidia-smi") else None
    info["nvidia_smi"] = smi.stdout.strip() if smi is not None else None
    print(json.dumps(info, indent=1))
    out.write_text(json.dumps(info, indent=1) + "\n")
    return info


def _which(name: str) -> bool:
    import shutil

    return shutil.which(name) is not None


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def suite(junit: Path, out: Path) -> dict:
    """Counts per backend (the test id's GPU case) and every failure's name and message, from pytest's JUnit XML."""
    result: dict[str, Any] = {"backends": {}, "failures": [], "totals": {}}
    if not junit.is_file():
        result["error"] = f"no JUnit XML at {junit}: pytest did not get as far as writing it"
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(result["error"])
        return result
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        message = ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (el.get("message") or el.text or "").strip()
                break
        params = case.get("name", "").partition("[")[2]
        backend = next((b for b in SUITE_BACKENDS if re.search(rf"(^|-){re.escape(b)}(-|]|$)", params)), "other")
        counts = result["backends"].setdefault(backend, {"passed": 0, "failed": 0, "error": 0, "skipped": 0})
        counts[outcome] += 1
        result["totals"][outcome] = result["totals"].get(outcome, 0) + 1
        if outcome in ("failed", "error"):
            result["failures"].append({"test": name, "backend": backend, "message": message[:600]})
        elif outcome == "skipped" and backend != "other":
            result.setdefault("skips", []).append({"test": name, "backend": backend, "message": message[:300]})
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"suite: {result['totals']}; per backend: {result['backends']}")
    return result


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def report(work: Path, outdir: Path, dry_run: bool) -> int:
    """Merge the parts' results into OUTDIR's report.json and report.md, copy the logs, print the summary."""
    outdir.mkdir(parents=True, exist_ok=True)
    parts = {p: _load(work / "parts" / f"{p}.json") for p in PARTS}
    parts = {p: v for p, v in parts.items() if v is not None}
    data = {"dry_run": dry_run, "parts": parts, "machine": _load(work / "machine.json"),
            "suite": _load(work / "suite.json"), "verify": _verify_summary(_load(work / "verify.json")),
            "bench": {s: _load(work / f"bench_{s}.json") for s in ("layer", "sdpa", "few_query")},
            "tabpfn9": _load(work / "tabpfn9.json")}
    data["bench"] = {k: v for k, v in data["bench"].items() if v is not None}
    for rows in (b["rows"] for b in data["bench"].values()):
        _add_ratios(rows)
    (outdir / "report.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (outdir / "report.md").write_text(markdown(data))
    _copy_logs(work, outdir)
    files = sorted(p.name for p in outdir.iterdir() if p.is_file())
    if len(files) > MAX_FILES:
        print(f"campaign: {len(files)} files in {outdir}, more than the {MAX_FILES} that come back: {files}")
    lines = summary(data)
    print("\n".join(lines))
    bad = [p for p, v in parts.items() if v["status"] not in ("ok", "skipped")]
    return 1 if bad else 0


def _verify_summary(v: Any) -> Any:
    if not isinstance(v, dict) or "results" not in v:
        return v
    failing = {xp: [f"{r['case_id']}:{r['key']} {r['error']:.1e} > {r['tolerance']:.0e}" for r in rows if not r["ok"]]
               for xp, rows in v["results"].items()}
    worst = {xp: max((r["error"] / r["tolerance"] for r in rows), default=0.0) for xp, rows in v["results"].items()}
    errors = {xp: {f"{r['case_id']}:{r['key']}:{r['dtype']}": r["error"] for r in rows} for xp, rows in v["results"].items()}
    return {"failed": v.get("failed"), "ok": v.get("ok"), "checked": {xp: len(r) for xp, r in v["results"].items()},
            "worst_error_over_tolerance": worst, "failing": failing, "skipped": v.get("skipped"), "errors": errors}


def _add_ratios(rows: list[dict]) -> None:
    """ours / theirs for time and peak memory, against torch's kernel of the same case: FlashAttention where it
    runs, else the fastest other than the math kernel, else the math kernel."""
    def rank(r: dict) -> tuple[int, float]:
        return ({"flash": 0, "math": 2}.get(r.get("kernel"), 1), r["median_s"])

    base: dict[str, dict] = {}
    for r in rows:
        if ("median_s" in r and not r["side"].startswith("ours")
                and (r["case"] not in base or rank(r) < rank(base[r["case"]]))):
            base[r["case"]] = r
    for r in rows:
        b = base.get(r["case"])
        if b is None or not r["side"].startswith("ours") or "median_s" not in r:
            continue
        r["vs"] = f"{b['side']}" + (f" [{b['kernel']}]" if b.get("kernel") else "")
        r["time_ratio"] = r["median_s"] / b["median_s"]
        if r.get("peak_bytes") is not None and b.get("peak_bytes"):
            r["memory_ratio"] = r["peak_bytes"] / b["peak_bytes"]


def _copy_logs(work: Path, outdir: Path) -> None:
    grouped: dict[str, list[Path]] = {}
    for part, name in LOGS.items():
        log = work / "logs" / f"{part}.log"
        if log.is_file():
            grouped.setdefault(name, []).append(log)
    for name, logs in grouped.items():
        text = "".join(f"===== {p.stem}\n{p.read_text(errors='replace')}\n" for p in logs)
        raw = text.encode()
        if len(raw) > MAX_LOG_BYTES:
            raw = b"[... the beginning cut: only the last 4 MiB kept ...]\n" + raw[-MAX_LOG_BYTES:]
        (outdir / name).write_bytes(raw)


def _mib(b: Any) -> str:
    return "" if b is None else f"{b / 2**20:.0f}"


def markdown(d: dict) -> str:
    m = d.get("machine") or {}
    title = "GPU campaign" + (" (dry run: CPU stand-ins, plumbing only)" if d["dry_run"] else "")
    lines = [f"# {title}", "", f"- machine: {m.get('gpu') or 'no GPU'}; CPU {m.get('cpu')}; {m.get('platform')}",
             f"- nvidia-smi: {m.get('nvidia_smi')}; CUDA runtime {m.get('cuda_runtime')}, driver {m.get('cuda_driver')}",
             f"- versions (the machine's own, before the carried wheels): {m.get('versions')}", "", "## Parts", "", "| part | status | seconds | limit |", "|---|---|---|---|"]
    for p, v in d["parts"].items():
        lines.append(f"| {p} | {v['status']} | {v['seconds']:.0f} | {v['limit_s']} |")
    s = d.get("suite") or {}
    if s.get("backends"):
        lines += ["", "## Test suite (pytest -m gpu)", "", "| backend | passed | failed | error | skipped |", "|---|---|---|---|---|"]
        for b, c in s["backends"].items():
            lines.append(f"| {b} | {c['passed']} | {c['failed']} | {c['error']} | {c['skipped']} |")
        for f in s.get("failures", [])[:60]:
            lines.append(f"- FAIL `{f['test']}`: {f['message'][:300]}".replace("\n", " "))
    v = d.get("verify")
    if v:
        brief = {k: v.get(k) for k in ("checked", "failed", "worst_error_over_tolerance", "failing")} if isinstance(v, dict) else v
        lines += ["", "## Fixtures (mha-cupy verify)", "", f"`{json.dumps(brief, default=str)[:3000]}`"]
        for xp, errs in (v.get("errors") or {}).items() if isinstance(v, dict) else ():
            lines += ["", f"| fixture:array:dtype ({xp}) | scaled error |", "|---|---|"]
            lines += [f"| {k} | {e:.2e} |" for k, e in errs.items()]
    for section, b in d["bench"].items():
        cut = "" if b.get("complete", True) else " (stopped before its end: the rows it measured)"
        lines += ["", f"## Benchmark: {section}{cut}", "", "| case | side | ms | TFLOP/s | peak MiB | vs | time ratio | memory ratio | scaled error |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in b["rows"]:
            side = r["side"] + (f" [{r['kernel']}]" if r.get("kernel") else "")
            if "median_s" not in r:
                lines.append(f"| {r['case']} | {side} | {r.get('skipped') or 'ERROR ' + str(r.get('error'))[:200]} | | | | | | |")
                continue
            err = "" if r.get("scaled_error") is None else f"{r['scaled_error']:.1e}" + ("" if r.get("ok") else " FAIL")
            lines.append(f"| {r['case']} | {side} | {r['median_s'] * 1e3:.2f} | {_fmt(r.get('tflops'), '.1f')} | "
                         f"{_mib(r.get('peak_bytes'))} | {r.get('vs', '')} | {_fmt(r.get('time_ratio'), '.2f')} | "
                         f"{_fmt(r.get('memory_ratio'), '.2f')} | {err} |")
    t = d.get("tabpfn9")
    if t:
        lines += ["", "## TabPFN 9 backend on CUDA", "", "```", json.dumps(t, indent=1, default=str)[:6000], "```"]
    return "\n".join(lines) + "\n"


def _fmt(x: Any, spec: str) -> str:
    return "" if x is None else format(x, spec)


def summary(d: dict) -> list[str]:
    lines = ["", "== summary" + (" (dry run)" if d["dry_run"] else "")]
    for p, v in d["parts"].items():
        lines.append(f"{p:16s} {v['status']:8s} {v['seconds']:6.0f} s")
    s = d.get("suite") or {}
    for b, c in (s.get("backends") or {}).items():
        lines.append(f"suite {b:11s} {c['passed']} passed, {c['failed']} failed, {c['error']} errors, {c['skipped']} skipped")
    v = d.get("verify")
    if isinstance(v, dict) and "checked" in v:
        lines.append(f"verify: {v['checked']} checked, failed {v['failed']}")
    for section, b in d["bench"].items():
        bad = sum(1 for r in b["rows"] if "error" in r or r.get("ok") is False)
        ratios = [r["time_ratio"] for r in b["rows"] if "time_ratio" in r]
        span = f", ours/torch time {min(ratios):.2f}-{max(ratios):.2f}" if ratios else ""
        lines.append(f"bench {section}: {len(b['rows'])} rows, {bad} failed or off tolerance{span}")
    t = d.get("tabpfn9")
    if isinstance(t, dict):
        lines.append(f"tabpfn9: ok={t.get('ok')} {str(t.get('summary', ''))[:300]}")
    bad = [p for p, v in d["parts"].items() if v["status"] not in ("ok", "skipped")]
    lines.append(f"campaign: {len(d['parts']) - len(bad)} of {len(d['parts'])} parts ok or skipped"
                 + (f"; to rerun: --only {','.join(bad)}" if bad else ""))
    return lines


def main(argv: list[str]) -> int:
    dry = "--dry-run" in argv
    args = [a for a in argv if a != "--dry-run"]
    if len(args) >= 2 and args[0] == "machine":
        machine(Path(args[1]), dry)
        return 0
    if len(args) >= 3 and args[0] == "suite":
        suite(Path(args[1]), Path(args[2]))
        return 0
    if len(args) >= 3 and args[0] == "report":
        return report(Path(args[1]), Path(args[2]), dry)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
