#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored, at the repository root) the wheels the GPU machine lacks. That machine has no
# network: Python 3.12.3 on x86-64 Linux with numpy 2.5.2, cupy-cuda13x 14.2.0, torch 2.11.0+cu130, jax 0.11.2,
# scipy, scikit-learn, pandas, matplotlib, einops, huggingface-hub 1.x, pytest... but no array-api-*, tabpfn or
# pydantic. Two sets, each installed alone into its own --target (tabpfn 2.2.1 and tabpfn 9 cannot share one):
#
#   .whl/main/     the main suite and benchmarks: array-api-{compat,extra,strict} and tabpfn 2.2.1 (the reference
#                  layer, imported under SCIPY_ARRAY_API=1) with scikit-learn 1.6.1 (tabpfn 2.2.1 pins < 1.7)
#   .whl/tabpfn9/  tabpfn 9.2.0 (mha_cupy.tabpfn's attention backend) and what it lacks there, with
#                  array-api-{compat,extra} so that this set alone completes the machine
#
# There, with .whl carried:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_main .whl/main/*.whl
#   PYTHONPATH=/tmp/site_main:$PWD SCIPY_ARRAY_API=1 python3 -m pytest ...
# (likewise .whl/tabpfn9 into /tmp/site_9). pip's --no-deps is deliberate: the machine's own torch, numpy, pandas...
# stay; some of them lie outside the pins' declared bounds (tabpfn 2.2.1 asks for pandas < 3 and
# huggingface-hub < 1) and import fine all the same.
#
# Idempotent: a pinned wheel already in place is not fetched again; a wheel in a set's folder that is not pinned is
# removed. Prints each set's size and what travels in all (the working tree, tracked and untracked-not-ignored, plus
# .whl), and fails if that reaches the device tool's 64 MiB.
#
# Usage: benchmarks/gpu/wheels.sh        ($PYTHON picks the Python that runs pip; python3 by default)
set -euo pipefail

PYTHON=${PYTHON:-python3}
ROOT=$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)
WHL=$ROOT/.whl
LIMIT_MIB=64

# Shared by both sets: pydantic (tabpfn's configs and settings) and what it needs. typing-extensions travels because
# pydantic 2.14 needs >= 4.16 and the machine's version is unknown.
PYDANTIC=(
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0
    pydantic-settings==2.16.3
    python-dotenv==1.2.4
)

MAIN=(
    array-api-compat==1.16.0
    array-api-extra==0.11.5
    array-api-strict==2.6.1
    tabpfn==2.2.1
    scikit-learn==1.6.1
    "${PYDANTIC[@]}"
    eval-type-backport==0.4.0
    tabpfn-common-utils==0.2.23
    posthog==7.91.1
    backoff==2.2.1
    distro==1.9.0
    platformdirs==4.14.9
)

TABPFN9=(
    tabpfn==9.2.0
    array-api-compat==1.16.0
    array-api-extra==0.11.5
    "${PYDANTIC[@]}"
    skrub==0.10.1
    pydot==4.0.1
    lightgbm==4.7.0
)

PIP_DOWNLOAD=(
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64
)

# A distribution name as wheel file names spell it, compared case-blind: runs of '-', '_', '.' become one '_'.
norm() { printf '%s' "$1" | tr '[:upper:]' '[:lower:]' | sed -E 's/[-_.]+/_/g'; }

# fetch DIR PIN...: each NAME==VERSION wheel into DIR unless there, then every other wheel in DIR removed.
fetch() {
    local dir=$1 pin name version f base key
    shift
    mkdir -p "$dir"
    local -A keep=()
    for pin in "$@"; do
        name=${pin%%==*} version=${pin#*==}
        key="$(norm "$name")-$version"
        keep[$key]=1
        local found=
        for f in "$dir"/*.whl; do
            [[ -e $f ]] || continue
            base=$(basename "$f")
            if [[ "$(norm "${base%%-*}")-$(cut -d- -f2 <<<"$base")" == "$key" ]]; then found=$f; break; fi
        done
        if [[ -z $found ]]; then
            echo "downloading $pin into ${dir#"$ROOT"/}"
            "${PIP_DOWNLOAD[@]}" -d "$dir" "$pin"
        fi
    done
    for f in "$dir"/*.whl; do
        [[ -e $f ]] || continue
        base=$(basename "$f")
        if [[ -z ${keep["$(norm "${base%%-*}")-$(cut -d- -f2 <<<"$base")"]:-} ]]; then
            echo "removing stray $base"
            rm -f -- "$f"
        fi
    done
}

fetch "$WHL/main" "${MAIN[@]}"
fetch "$WHL/tabpfn9" "${TABPFN9[@]}"

# Bytes of the files under a folder, and of what travels: the working tree (tracked files that exist, untracked ones
# git does not ignore) plus .whl.
bytes() { find "$@" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}'; }
tree_bytes=$(git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
    | (cd "$ROOT" && xargs -0 -r stat -c '%s %n' -- 2>/dev/null || true) | awk '{s += $1} END {print s + 0}')
main_bytes=$(bytes "$WHL/main")
t9_bytes=$(bytes "$WHL/tabpfn9")
whl_bytes=$(bytes "$WHL")
total=$((tree_bytes + whl_bytes))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }

echo ".whl/main:    $(ls "$WHL/main"/*.whl | wc -l) wheels, $(mib "$main_bytes")"
echo ".whl/tabpfn9: $(ls "$WHL/tabpfn9"/*.whl | wc -l) wheels, $(mib "$t9_bytes")"
echo ".whl in all:  $(mib "$whl_bytes")"
echo "working tree: $(mib "$tree_bytes")"
echo "travels:      $(mib "$total") of $LIMIT_MIB MiB"
if ((total >= LIMIT_MIB * 1048576)); then
    echo "error: what travels ($(mib "$total")) reaches the device's $LIMIT_MIB MiB limit: pin fewer or smaller wheels" >&2
    exit 1
fi
