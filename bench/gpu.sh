#!/usr/bin/env bash
# Everything a lent GPU machine (no network, one call of at most 10 minutes) is for:
# build csrc into echox_cuda, run the `gpu` tests, then every benchmark into bench/results/.
# Results are also copied to $OUT when it is set (the device tool brings back only that folder).
#   bash bench/gpu.sh [report.py options, e.g. --overwrite]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
python -m pip install -q --no-build-isolation --no-deps -e . || exit 1
python -c "import echox_cuda; print('echox_cuda built')" || echo "echox_cuda NOT built: CUDA kernels are not timed"
python -m pytest -q -m gpu tests/ 2>&1 | tail -n 30
gpu_tests=${PIPESTATUS[0]}
started=$(mktemp)  # its time stamp marks which results files this run wrote
python bench/report.py --device cuda "$@"
report=$?
if [ -n "${OUT:-}" ]; then
    find bench/results -newer "$started" -type f -exec cp {} "$OUT"/ \;
fi
echo "gpu tests exit code ${gpu_tests}; report exit code ${report}"
exit $(( gpu_tests != 0 || report != 0 ))
