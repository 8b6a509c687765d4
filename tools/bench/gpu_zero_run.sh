#!/usr/bin/env bash
# On the GPU machine: install ds-core + ds-zero (+ DeepSpeed's wheels), optionally run the
# ZeRO GPU tests, then the training benchmark suite with every argument passed through:
#   tools/bench/gpu_zero_run.sh [train_llm_suite.py / train_llm.py options...]
#   e.g. tools/bench/gpu_zero_run.sh --modes fsdp2 ds-zero3 --sweep-micro-batch 8,16 --compile
# Environment: OUT (what comes back; default .out/zero), GPU_TESTS=1 to run test_gpu_stages.py
# first, REINSTALL=1 to rebuild ds although an earlier call on this machine installed it.
# The suite works in /tmp/train_llm, which outlives a call while the machine stays warm, so a
# later call (or a second invocation in the same command) adds to the same tables with
# --append. OUT receives 4 files (the device tool returns at most 8): train_llm.json,
# train_llm.md, suite.log and logs.tgz (per-run output, build log, ds report, GPU and host facts).
set -uo pipefail
# DeepSpeed's JIT op builder cannot parse "9.0a"; name plain architectures for it.
# NVLink multicast (NVLS) stays off on these machines.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_CUDA_ARCH_LIST=9.0
OUT=${OUT:-$PWD/.out/zero}
WORK=/tmp/train_llm
LOGS="$WORK/logs"
mkdir -p "$OUT" "$LOGS"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$LOGS/gpus.csv"
free -g > "$LOGS/host-memory.txt"; df -h /tmp "$PWD" >> "$LOGS/host-memory.txt"
# The image's torch lives outside what a venv sees: install into a target folder instead.
export PYTHONPATH=/tmp/site
py=python3
if [[ ! -f /tmp/site/.ds-installed || -n "${REINSTALL:-}" ]]; then
    rm -rf /tmp/site
    wheels=()
    for name in pydantic pydantic_core annotated_types typing_inspection hatchling pathspec trove_classifiers \
                scikit_build_core pybind11; do wheels+=(.whl/gpu/${name}-*.whl); done
    $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${wheels[@]}" .whl/bench/*.whl || exit 1
    start=$(date +%s)
    $py -m pip install -q --no-deps --no-build-isolation --target /tmp/site --upgrade packages/core packages/zero \
        > "$LOGS/build.log" 2>&1 || { tail -30 "$LOGS/build.log"; exit 1; }
    echo "installed ds in $(( $(date +%s) - start )) s"
    touch /tmp/site/.ds-installed
fi
$py -m ds.core.cli report > "$LOGS/ds-report.txt" 2>&1
if [[ -n "${GPU_TESTS:-}" ]]; then
    $py -m pytest -q -p no:cacheprovider packages/zero/tests/test_gpu_stages.py 2>&1 | tee "$LOGS/gpu-tests.log" | tail -15
fi
$py tools/bench/train_llm_suite.py --out "$WORK" "$@" 2>&1 | tee -a "$WORK/suite.log" | grep -E ' mb [0-9]+: |^skipping' | cut -c1-400
status=${PIPESTATUS[0]}
sed -n '/^## Best/,/^## Every/p' "$WORK/train_llm.md" 2>/dev/null
cp "$WORK/suite.log" "$OUT/"
cp "$WORK"/train_llm.json "$WORK"/train_llm.md "$OUT/" 2>/dev/null
tar czf "$OUT/logs.tgz" -C "$WORK" logs $( [[ -d "$WORK/runs" ]] && echo runs )
exit "$status"
