#!/usr/bin/env bash
# The CPU variant of bench/gpu.sh, for the CI machine: microbenchmarks at CPU shapes and the
# e2e benchmark at tiny and mid sizes, in the same report format under bench/results/.
#   bash bench/cpu.sh [report.py options, e.g. --overwrite]
set -euo pipefail
cd "$(dirname "$0")/.."
python bench/report.py --device cpu "$@"
