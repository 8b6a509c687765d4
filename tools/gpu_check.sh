#!/usr/bin/env bash
# The one entry point for work on a GPU machine: install ds with its CUDA kernels built for
# the card, run every `gpu`-marked test, run benchmarks, and pack everything for the trip back.
#
# The GPU machine has torch but no package index, so this runs in two places:
#
#   tools/gpu_check.sh stage              # here: wheels ds needs beyond the GPU image's own
#                                         # packages into .whl/gpu, the peer (DeepSpeed, built
#                                         # with DS_BUILD_OPS=0) into .whl/bench; carry .whl
#   OUT=/results tools/gpu_check.sh install
#   OUT=/results tools/gpu_check.sh tests [pytest args]      # default: every gpu test
#   OUT=/results tools/gpu_check.sh bench "kernels --quick" "train_llm_suite --gpus 2" ...
#   OUT=/results tools/gpu_check.sh pack  # $OUT/results.tar.gz + $OUT/summary.txt
#
# Installs go to folders on PYTHONPATH rather than a virtual environment (the image's torch is
# not visible from one). `install` is skipped when the same tree was installed on this warm
# machine already, so several calls in a row pay for the build once. Each bench argument runs
# `tools/bench/<script>.py <args> --out $OUT/<script>` and its log goes to $OUT/<script>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
# DeepSpeed's JIT op builder cannot parse "9.0a" (the image's own value): name plain architectures.
export TORCH_CUDA_ARCH_LIST=9.0
OUT=${OUT:-$PWD/.out/gpu}
DEPS=/tmp/ds-gpu/deps
SITE=/tmp/ds-gpu/site
export PYTHONPATH=$SITE:$DEPS${PYTHONPATH:+:$PYTHONPATH}
GPU_PYTHON=${GPU_PYTHON:-3.12}
STAGED=(pluggy "pydantic>=2.6" "pyyaml>=6" safetensors pytest pytest-timeout hatchling "scikit-build-core>=0.10"
        "pybind11>=2.12" psutil)
# DeepSpeed's own requirements (its wheel's Requires-Dist, less torch, numpy, packaging, pydantic, psutil).
PEER_DEPS=(hjson py-cpuinfo msgpack einops ninja tqdm)

# Binary wheels for the GPU machine's Python into folder $1.
download_for_gpu() {
    local dest=$1; shift
    python3 -m pip download --quiet --dest "$dest" --only-binary=:all: --python-version "$GPU_PYTHON" \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform any "$@"
}

stage() {
    download_for_gpu .whl/gpu "${STAGED[@]}" || return 1
    download_for_gpu .whl/bench "${PEER_DEPS[@]}" || return 1
    if ! ls .whl/bench/deepspeed-*.whl > /dev/null 2>&1; then
        DS_BUILD_OPS=0 python3 -m pip wheel --quiet --no-deps --no-binary deepspeed -w .whl/bench deepspeed==0.19.8 \
            || return 1
    fi
    echo "staged: $(ls .whl/gpu .whl/bench | grep -c whl) wheels"
}

install() {
    mkdir -p "$OUT"
    local stamp
    stamp=$(find packages -path '*/build' -prune -o -type f \( -name '*.py' -o -name '*.cu' -o -name '*.h' \
            -o -name '*.cpp' -o -name '*.toml' -o -name 'CMakeLists.txt' \) -print0 | sort -z | xargs -0 cat | md5sum)
    if [[ -f $SITE/.stamp && "$(cat "$SITE/.stamp")" == "$stamp" ]]; then
        echo "ds already installed from this tree"; return 0
    fi
    rm -rf /tmp/ds-gpu && mkdir -p "$DEPS" "$SITE"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpus.csv"
    # Only what the image lacks: an installed package of another version stays the image's.
    local missing=()
    for wheel in .whl/gpu/*.whl .whl/bench/*.whl; do
        local name; name=$(basename "$wheel" | cut -d- -f1)
        # pydantic and its core must come as the pair staged here, whatever the image has.
        [[ $name == pydantic* ]] || ! python3 -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$name" \
            2> /dev/null || continue
        missing+=("$wheel")
    done
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$DEPS" "${missing[@]}" || return 1
    local arch
    arch=$(python3 -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}a-real" if m == 9 else f"{m}{n}-real")')
    local start; start=$(date +%s)
    # One pip call for every ds package: --target cannot merge the ds/ namespace across calls.
    DS_CUDA_ARCHS=$arch DS_REQUIRE_NATIVE=1 python3 -m pip install --no-deps --no-build-isolation --target "$SITE" \
        packages/core packages/zero packages/kernels-cuda > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; return 1; }
    echo "built ds for $arch in $(( $(date +%s) - start )) s"
    echo "$stamp" > "$SITE/.stamp"
    python3 -m ds.core.cli report > "$OUT/ds-report.txt" 2>&1
}

tests() {
    mkdir -p "$OUT"
    local args=("$@")
    [[ ${#args[@]} -gt 0 ]] || args=(-m gpu packages tests)
    python3 -m pytest -q -p no:cacheprovider --timeout=900 -W ignore::pytest.PytestUnknownMarkWarning \
        --junitxml="$OUT/gpu-tests.xml" "${args[@]}" 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
    return "${PIPESTATUS[0]}"
}

bench() {
    mkdir -p "$OUT"
    local status=0
    for spec in "$@"; do
        read -r -a words <<< "$spec"
        python3 "tools/bench/${words[0]}.py" "${words[@]:1}" --out "$OUT/${words[0]}" \
            2>&1 | tee "$OUT/${words[0]}.log" | tail -25
        [[ ${PIPESTATUS[0]} -eq 0 ]] || { echo "bench ${words[0]} FAILED"; status=1; }
    done
    return "$status"
}

pack() {
    # The trip back takes at most 8 files, two folders deep: one archive holds the rest.
    (cd "$OUT" && find . -name '*.md' ! -name summary.md -print0 | sort -z | xargs -0 -r cat > summary.md
     tar czf /tmp/results.tar.gz --exclude=results.tar.gz . && mv /tmp/results.tar.gz results.tar.gz
     find . -mindepth 1 -maxdepth 1 ! -name results.tar.gz ! -name summary.md ! -name gpus.csv -exec rm -rf {} +)
}

case "${1:-}" in
    stage | install | tests | bench | pack) cmd=$1; shift; "$cmd" "$@" ;;
    *) echo "usage: $0 stage | install | tests [pytest args] | bench \"<script> [args]\" ... | pack" >&2; exit 2 ;;
esac
