#!/usr/bin/env bash
# Every `gpu`-marked test, then the benchmarks named on the command line, on a GPU machine.
#
# The GPU machine has torch but no package index, so this runs in two places:
#
#   tools/gpu_check.sh stage                       # here: download what ds needs beyond torch
#                                                  # into .whl/gpu (carry that folder along)
#   OUT=/results tools/gpu_check.sh run "kernels --quick" "dp_overhead --world 2"
#                                                  # there: install ds, test, benchmark
#
# `run` installs every package under packages/ into a virtual environment over the
# machine's own torch, writes nvidia-smi's view of the cards, the pytest log and a JUnit
# report to $OUT, and then runs each argument as `tools/bench/<script>.py <args>
# --out $OUT/<script>`. It exits non-zero if the tests or any benchmark fail.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl/gpu}
GPU_PYTHON=${GPU_PYTHON:-3.12}   # the GPU image's python3
STAGED=(pluggy "pydantic>=2.6" "pyyaml>=6" safetensors pytest pytest-timeout hatchling "scikit-build-core>=0.10" "pybind11>=2.12")

stage() {
    python3 -m pip download --quiet --dest "$WHEELS" --only-binary=:all: \
        --python-version "$GPU_PYTHON" --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        --platform any "${STAGED[@]}"
    echo "staged $(ls "$WHEELS" | wc -l) wheels in $WHEELS for Python $GPU_PYTHON"
}

run() {
    OUT=${OUT:-$PWD/.out/gpu}
    mkdir -p "$OUT"
    export PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpus.csv"
    python3 -m venv --system-site-packages /tmp/ds-gpu-venv || return 1
    local python=/tmp/ds-gpu-venv/bin/python
    local pip=("$python" -m pip install --quiet --no-index --find-links "$WHEELS")
    "${pip[@]}" "${STAGED[@]}" || return 1
    local packages
    mapfile -t packages < <(dirname packages/*/pyproject.toml)
    "${pip[@]}" --no-build-isolation "${packages[@]}" > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; return 1; }
    "$python" -m ds.core.cli report > "$OUT/ds-report.txt" 2>&1

    local status=0
    "$python" -m pytest -m gpu --timeout=1800 --junitxml="$OUT/gpu-tests.xml" -p no:cacheprovider \
        2>&1 | tee "$OUT/gpu-tests.log" | tail -30
    [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
    for bench in "$@"; do
        read -r -a words <<< "$bench"
        "$python" "tools/bench/${words[0]}.py" "${words[@]:1}" --out "$OUT/${words[0]}" \
            2>&1 | tee "$OUT/${words[0]}.log" | tail -30
        [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
    done
    return "$status"
}

case "${1:-}" in
    stage) stage ;;
    run) shift; run "$@" ;;
    *) echo "usage: $0 stage | run [\"<tools/bench script> [args]\" ...]" >&2; exit 2 ;;
esac
