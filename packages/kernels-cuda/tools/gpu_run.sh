#!/usr/bin/env bash
# Build ds-kernels-cuda for the local GPU, run its tests and the kernel benchmark, in one go.
#
# Meant for a fresh GPU machine without network: wheels it lacks (ds-core, pydantic,
# DeepSpeed and its small dependencies) are expected in $WHEELS. Logs and results go to
# $OUT (default ./.out/kernels). Usage: packages/kernels-cuda/tools/gpu_run.sh [--quick]
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/.out/kernels}
WHEELS=${WHEELS:-.whl/kernels}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"

rm -rf /tmp/site /tmp/site-kernels
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl || exit 1
export PYTHONPATH=/tmp/site

arch=$(python3 -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}a-real" if m == 9 else f"{m}{n}-real")')
start=$(date +%s)
# A separate target: pip --target will not merge into the existing ds/ namespace folder.
DS_CUDA_ARCHS=$arch python3 -m pip install --no-deps --no-build-isolation --target /tmp/site-kernels \
    packages/kernels-cuda > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "built for $arch in $(( $(date +%s) - start )) s"
export PYTHONPATH=/tmp/site-kernels:/tmp/site

python3 -m pytest packages/kernels-cuda/tests -q -p no:cacheprovider -W ignore::pytest.PytestUnknownMarkWarning \
    2>&1 | tee "$OUT/tests.log" | tail -40

export TORCH_CUDA_ARCH_LIST=9.0
python3 tools/bench/kernels.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | tail -60
