#!/usr/bin/env bash
# The GPU campaign: one command that a session lent a GPU passes to the device tool as it stands.
#
#   bash benchmarks/gpu/campaign.sh [--dry-run] [--only PART[,PART...]] [--out DIR]
#
# Parts, in order, each under its own time limit (a hang in one cannot eat the others):
#   machine          GPU, driver, CUDA, CuPy/torch/JAX/NumPy versions (nvidia-smi, cupy.show_config())
#   install          the carried wheels (.whl/main, .whl/tabpfn9) and this checkout, each set into its own --target
#   suite            the backend-parametrised tests on CuPy, torch CUDA and JAX's GPU (pytest -m gpu)
#   verify           tabpfn 2.2.1's fixtures replayed on CuPy (mha-cupy verify --xp cupy)
#   bench_layer, bench_sdpa, bench_few_query
#                    benchmarks/gpu/bench_gpu.py's sections, beside torch/tabpfn on CUDA in one process
#   tabpfn9          the TabPFN 9 backend on CUDA tensors (benchmarks/gpu/tabpfn9_gpu.py and
#                    tests_tabpfn9/test_cuda_route.py, with its own wheel set)
# Everything lands in DIR (default $OUT, else ./campaign-out): report.json, report.md and one log per part
# group (8 files at most, what the device tool brings back); the summary is printed last.
#
# --dry-run runs every part on this CPU: NumPy and torch CPU stand in for CuPy and CUDA, sizes are small,
# and the wheel install goes into a target folder as it will there (plumbing only; tests/test_campaign.py).
# --only reruns some parts (install follows whatever needs it), e.g. --only suite,bench_sdpa.
# SUITE_ARGS adds pytest arguments to the suite part (e.g. SUITE_ARGS="-k test_fixtures");
# CAMPAIGN_LIMIT_<part>=SECONDS changes a part's time limit; CAMPAIGN_DEADLINE=SECONDS (default 570, inside the
# device tool's 600 s a command) cuts the last parts short so that the whole run ends in time;
# CAMPAIGN_KEEP_WORK=1 keeps the work folder.
set -uo pipefail
CALLER_DIR=$PWD
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=${PYTHON:-python3}
DRY=0
ONLY=""
OUTDIR=${OUT:-}
ALL_PARTS="machine install suite verify bench_layer bench_sdpa bench_few_query tabpfn9"

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) ONLY=${2:?--only needs a comma-separated list of parts}; shift ;;
    --only=*) ONLY=${1#--only=} ;;
    --out) OUTDIR=${2:?--out needs a folder}; shift ;;
    --out=*) OUTDIR=${1#--out=} ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) echo "campaign.sh: unknown argument '$1' (expected --dry-run, --only PARTS, --out DIR; see --help)" >&2; exit 2 ;;
  esac
  shift
done
for p in ${ONLY//,/ }; do
  case " $ALL_PARTS " in *" $p "*) ;; *) echo "campaign.sh: --only: unknown part '$p', expected some of: $ALL_PARTS" >&2; exit 2 ;; esac
done
for v in $(compgen -v CAMPAIGN_LIMIT_) CAMPAIGN_DEADLINE; do
  [ -z "${!v:-}" ] || [[ ${!v} =~ ^[0-9]+$ ]] || { echo "campaign.sh: $v must be a whole number of seconds, got '${!v}'" >&2; exit 2; }
done
OUTDIR=${OUTDIR:-$ROOT/campaign-out}
case $OUTDIR in /*) ;; *) OUTDIR=$CALLER_DIR/$OUTDIR ;; esac
mkdir -p "$OUTDIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/campaign.XXXXXX")
[ "${CAMPAIGN_KEEP_WORK:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/logs" "$WORK/parts"
SITE=$WORK/site
SITE9=$WORK/site9
export PYTHONUNBUFFERED=1 SCIPY_ARRAY_API=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX would take 75% of the GPU before CuPy and torch get any
DRYFLAG=""
[ "$DRY" = 1 ] && DRYFLAG=--dry-run
START=$(date +%s)
DEADLINE=${CAMPAIGN_DEADLINE:-570}
export ROOT PY DRY WORK SITE SITE9 DRYFLAG OUTDIR

# Time limits in seconds: a part that overruns is stopped; the whole run took 7 min 12 s on the H200 (2026-12-04).
declare -A LIMIT=([machine]=25 [install]=45 [suite]=190 [verify]=30 [bench_layer]=45 [bench_sdpa]=160
                  [bench_few_query]=30 [tabpfn9]=90)

selected() {
  [ -z "$ONLY" ] && return 0
  [ "$1" = machine ] && return 0  # cheap, and every report names its machine
  case ",$ONLY," in *",$1,"*) return 0 ;; esac
  [ "$1" = install ] && { needs_main || needs_tabpfn9; }
}
# Which wheel sets the selected parts need: the main one for the suite, verify and benchmarks, the other for tabpfn9.
needs_main() { [ -z "$ONLY" ] || echo ",$ONLY," | grep -qE ',(suite|verify|bench_[a-z_]+),'; }
needs_tabpfn9() { [ -z "$ONLY" ] || case ",$ONLY," in *,tabpfn9,*) true ;; *) false ;; esac; }

# run_part NAME COMMAND...: COMMAND's output goes to logs/NAME.log; its exit status, time and limit to parts/NAME.json.
run_part() {
  local name=$1; shift
  selected "$name" || return 0
  local override="CAMPAIGN_LIMIT_$name" t0 t1 rc status
  local limit=${LIMIT[$name]} left
  [ "$DRY" = 1 ] && limit=$((limit * 2))  # a 2-core CI machine compiles numba's kernels within the parts
  limit=${!override:-$limit}
  left=$((DEADLINE - ($(date +%s) - START) - 15))  # 15 s for the kill and the report
  if [ "$left" -lt 10 ]; then
    echo "== $name: not started, the run's deadline (${DEADLINE} s) is near"
    printf '{"part": "%s", "status": "deadline", "rc": -1, "seconds": 0, "limit_s": 0}\n' "$name" >"$WORK/parts/$name.json"
    return 0
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== $name (limit ${limit} s)"
  t0=$(date +%s.%N)
  PART_LIMIT=$limit timeout --kill-after=10 "$limit" bash -c '"$@"' part "$@" >"$WORK/logs/$name.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    77) status=skipped ;;
    *) status=failed ;;
  esac
  printf '{"part": "%s", "status": "%s", "rc": %d, "seconds": %.1f, "limit_s": %d}\n' \
    "$name" "$status" "$rc" "$(awk "BEGIN {print $t1 - $t0}")" "$limit" >"$WORK/parts/$name.json"
  tail -n 4 "$WORK/logs/$name.log" | sed 's/^/   /'
  # The report so far, so that a run stopped from outside still brings back what it had
  "$PY" benchmarks/gpu/report.py report "$WORK" "$OUTDIR" $DRYFLAG >/dev/null 2>&1
  echo "   -> $status (rc $rc, $(awk "BEGIN {printf \"%.0f\", $t1 - $t0}") s)"
}

part_machine() {
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    nvidia-smi | head -n 4 || true
  else
    echo "nvidia-smi: not on this machine"
  fi
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  "$PY" benchmarks/gpu/report.py machine "$WORK/machine.json" $DRYFLAG
}

# install_set TARGET WHEEL_DIR: the wheels of WHEEL_DIR (if any) and this checkout, into TARGET, without the network.
install_set() {
  local target=$1 wheels=$2
  mkdir -p "$target"
  local pattern="*.whl"
  # The sets are built for the GPU machine's Python 3.12; a dry run elsewhere installs their pure-Python wheels.
  if [ "$DRY" = 1 ] && [ "$("$PY" -c 'import sys; print(sys.version_info[:2] == (3, 12))')" != True ]; then
    pattern="*-none-any.whl"
  fi
  if compgen -G "$wheels/$pattern" >/dev/null; then
    echo "installing $(ls "$wheels"/$pattern | wc -l) wheels ($pattern) from ${wheels#"$ROOT"/} into $target"
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "$wheels"/$pattern || return 1
  else
    echo "no wheels in ${wheels#"$ROOT"/} (run benchmarks/gpu/wheels.sh where pip can reach PyPI)"
    [ "$DRY" = 1 ] || return 1
  fi
  # The checkout without its dependencies, from a copy (the build writes build/ and *.egg-info beside the sources).
  local src=$WORK/src
  if [ ! -d "$src" ]; then
    mkdir -p "$src" && cp -r mha_cupy setup.cfg pyproject.toml README.md "$src"/
  fi
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-build-isolation --upgrade --target "$target" "$src"; then
    echo "installed the checkout into $target"
  elif [ "$DRY" = 1 ] && "$PY" -m pip install -q --no-deps --no-compile --upgrade --target "$target" "$src"; then
    echo "installed the checkout into $target (with build isolation: this environment lacks setuptools' wheel support)"
  else
    echo "could not install the checkout into $target$([ "$DRY" = 1 ] && echo ": the parts import it from the checkout")"
    [ "$DRY" = 1 ] || return 1
  fi
  (cd "$WORK" && PYTHONPATH=$target "$PY" -c "import mha_cupy, array_api_compat; print('import mha_cupy from', mha_cupy.__file__)")
}

part_install() {
  needs_main || { echo "the main set is not needed by --only $ONLY"; part_install_tabpfn9; return; }
  install_set "$SITE" "$ROOT/.whl/main" || return 1
  PYTHONPATH=$SITE:$ROOT "$PY" -c "import tabpfn, sklearn; print('tabpfn', tabpfn.__version__ if hasattr(tabpfn, '__version__') else '?', 'scikit-learn', sklearn.__version__)" \
    || { [ "$DRY" = 1 ] && echo "tabpfn 2.2.1 is not importable from this dry run's set: the benchmarks use this environment's"; } \
    || return 1
  needs_tabpfn9 || return 0
  part_install_tabpfn9
}

part_install_tabpfn9() {
  install_set "$SITE9" "$ROOT/.whl/tabpfn9" || return 1
  PYTHONPATH=$SITE9:$ROOT "$PY" -c "from importlib.metadata import version; import tabpfn.architectures.shared.attention_backends; print('tabpfn', version('tabpfn'))" \
    || { [ "$DRY" = 1 ] && echo "tabpfn 9 is not importable here: the tabpfn9 part will skip"; }
}

part_suite() {
  local args=(tests -m gpu -p no:cacheprovider -q -rfEs --tb=short --junitxml "$WORK/suite.xml")
  if [ "$DRY" = 1 ]; then  # the same plumbing on a small CPU selection
    args=(tests/test_attention.py -m "not slow" -k numpy -p no:cacheprovider -q -rfE --tb=short --junitxml "$WORK/suite.xml")
  fi
  PYTHONPATH=$SITE:$ROOT "$PY" -c "import xdist" 2>/dev/null && args+=(-n "$([ "$DRY" = 1 ] && echo 2 || echo 12)")
  PYTHONPATH=$SITE:$ROOT "$PY" -c "import pytest_timeout" 2>/dev/null && args+=(--timeout 120)
  # Interrupted (SIGINT) 20 s before the part's limit, pytest still writes the JUnit XML of what ran
  # shellcheck disable=SC2086
  local stop=$((PART_LIMIT - 20 > PART_LIMIT / 2 ? PART_LIMIT - 20 : PART_LIMIT / 2 + 1))
  PYTHONPATH=$SITE:$ROOT timeout -s INT "$stop" "$PY" -m pytest "${args[@]}" ${SUITE_ARGS:-}
  local rc=$?
  "$PY" benchmarks/gpu/report.py suite "$WORK/suite.xml" "$WORK/suite.json"
  return $rc
}

part_verify() {
  local xp=cupy
  [ "$DRY" = 1 ] && xp=numpy
  PYTHONPATH=$SITE:$ROOT "$PY" -c "import sys; from mha_cupy.cli import main; sys.exit(main(sys.argv[1:]))" \
    verify --xp "$xp" --json >"$WORK/verify.json"
  local rc=$?
  "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d.get(k) for k in ('failed', 'ok', 'error')})" "$WORK/verify.json"
  return $rc
}

part_bench() {
  PYTHONPATH=$SITE:$ROOT "$PY" benchmarks/gpu/bench_gpu.py --sections "$1" --out "$WORK/bench_$1.json" $DRYFLAG
}

part_tabpfn9() {
  if ! PYTHONPATH=$SITE9:$ROOT "$PY" -c "import tabpfn.architectures.shared.attention_backends" 2>"$WORK/tabpfn9-import.err"; then
    echo "tabpfn 9 is not importable with PYTHONPATH=$SITE9: $(tail -n 1 "$WORK/tabpfn9-import.err")"
    [ "$DRY" = 1 ] && return 77
    return 1
  fi
  PYTHONPATH=$SITE9:$ROOT "$PY" benchmarks/gpu/tabpfn9_gpu.py --out "$WORK/tabpfn9.json" $DRYFLAG
  local rc=$?
  # The CUDA route's own tests (they skip, with the reason, without a GPU)
  PYTHONPATH=$SITE9:$ROOT "$PY" -m pytest tests_tabpfn9/test_cuda_route.py -q -rfEs --tb=short -p no:cacheprovider || rc=1
  return $rc
}

export ONLY
export -f selected needs_main needs_tabpfn9 part_machine install_set part_install part_install_tabpfn9 part_suite part_verify part_bench part_tabpfn9
echo "campaign: $([ "$DRY" = 1 ] && echo "dry run (CPU stand-ins)" || echo "GPU run"), parts: ${ONLY:-all}, work in $WORK"
run_part machine part_machine
run_part install part_install
run_part suite part_suite
run_part verify part_verify
run_part bench_layer part_bench layer
run_part bench_sdpa part_bench sdpa
run_part bench_few_query part_bench few_query
run_part tabpfn9 part_tabpfn9
echo "campaign: $(( $(date +%s) - START )) s in all"
"$PY" benchmarks/gpu/report.py report "$WORK" "$OUTDIR" $DRYFLAG
