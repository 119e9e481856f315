#!/usr/bin/env bash
# The accelerator checks in one run (within ~5 minutes on one GPU): AMP bf16/fp16, torch.compile,
# channels_last, the 224 px speed table, 2-process NCCL runs of each `parallel` layout when two GPUs are visible.
# Writes benchmarks/results/gpu_check-cuda.json. Run from the repository root on the GPU machine:
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
"$PY" -m pip install -q -e . >/dev/null 2>&1 || true
exec "$PY" benchmarks/gpu_check.py "$@"
