#!/usr/bin/env bash
# On the GPU machine: install ds-core + ds-zero (+ DeepSpeed and FSDP2's peers' wheels),
# run the ZeRO GPU tests, then the training benchmark suite. Results under $OUT.
#   tools/bench/gpu_zero_run.sh [train_llm_suite args...]
set -uo pipefail
# DeepSpeed's JIT op builder cannot parse "9.0a"; name plain architectures for it.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_CUDA_ARCH_LIST=9.0
OUT=${OUT:-$PWD/.out/zero}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpus.csv"
# The image's torch lives outside what a venv sees: install into a target folder instead.
rm -rf /tmp/site
wheels=()
for name in pydantic pydantic_core annotated_types typing_inspection hatchling pathspec trove_classifiers \
            scikit_build_core pybind11; do wheels+=(.whl/gpu/${name}-*.whl); done
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${wheels[@]}" .whl/bench/*.whl || exit 1
export PYTHONPATH=/tmp/site
py=python3
start=$(date +%s)
$py -m pip install -q --no-deps --no-build-isolation --target /tmp/site --upgrade packages/core packages/zero > "$OUT/build.log" 2>&1 \
    || { tail -30 "$OUT/build.log"; exit 1; }
echo "installed ds in $(( $(date +%s) - start )) s"
$py -m ds.core.cli report > "$OUT/ds-report.txt" 2>&1
$py -m pytest -q -p no:cacheprovider packages/zero/tests/test_gpu_stages.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -15
$py tools/bench/train_llm_suite.py --out "$OUT" "$@" 2>&1 | tee "$OUT/suite.log" | tail -40
