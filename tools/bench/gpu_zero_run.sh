#!/usr/bin/env bash
# On the GPU machine: install ds-core + ds-zero (+ DeepSpeed and FSDP2's peers' wheels),
# run the ZeRO GPU tests, then the training benchmark suite. Results under $OUT.
#   tools/bench/gpu_zero_run.sh [train_llm_suite args...]
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-$PWD/.out/zero}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpus.csv"
python3 -m venv --system-site-packages /tmp/ds-zero-venv || exit 1
py=/tmp/ds-zero-venv/bin/python
$py -m pip install -q --no-index --find-links .whl/gpu pydantic hatchling scikit-build-core pybind11 pyyaml safetensors pluggy || exit 1
$py -m pip install -q --no-index --no-deps .whl/bench/*.whl || exit 1
start=$(date +%s)
$py -m pip install -q --no-deps --no-build-isolation packages/core packages/zero > "$OUT/build.log" 2>&1 \
    || { tail -30 "$OUT/build.log"; exit 1; }
echo "installed ds in $(( $(date +%s) - start )) s"
$py -m ds.core.cli report > "$OUT/ds-report.txt" 2>&1
$py -m pytest -q -p no:cacheprovider packages/zero/tests/test_gpu_stages.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -15
$py tools/bench/train_llm_suite.py --out "$OUT" "$@" 2>&1 | tee "$OUT/suite.log" | tail -40
