#!/usr/bin/env bash
# Everything the project promises on a GPU, measured: see scripts/gpu_check.py for the stages,
# the files written and the exit codes.
#
#     bash scripts/gpu_check.sh OUT_DIR [--stage tests|loader|train|predict|all] [--res 64,128,224]
#
# From the repository root, with PyTorch and the project's dependencies installed
# (scripts/offline_install.sh on an offline machine). PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHONUNBUFFERED=1 exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
