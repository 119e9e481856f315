#!/usr/bin/env bash
# The long-schedule study's grid (issue 28), in benchmarks/results/paper/fashion-mnist-long with the frozen
# calibration of FML_SETTINGS (no augmentation, weight decay 1e-4). Stages in priority order, each resumable
# cell by cell (paper.py skips finished cells), so killing and restarting this script loses only cells in
# flight:
#   1. the single model, seeds 0-3, 0 and 40 % noise: gate G3 (the ensemble ceiling), benchmarks/long_gates.py
#   2. hier4, hier4-norescale, ind4, seeds 0-2 (the rows the issue's verdicts need)
#   3. the single model's seed 4 (single >= 5 seeds)
#   4. one4, dml2, kdcl2, pcl4, seeds 0-2
#   5. hier4-late (regime.md §5's optional row: beta 1 -> 0.1 over the run), seeds 0-2
#   nohup nice -n 19 benchmarks/long_grid.sh 2 > /tmp/long_grid.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${1:-2}
OUT=benchmarks/results/paper/fashion-mnist-long
run() { .venv/bin/python benchmarks/paper.py --dataset fashion-mnist-long --noise 0,0.4 --jobs "$JOBS" --out "$OUT" "$@"; }
run --rows single --seeds 0,1,2,3
.venv/bin/python benchmarks/long_gates.py "$OUT"
run --rows hier4,hier4-norescale,ind4 --seeds 0,1,2
run --rows single --seeds 4
run --rows one4,dml2,kdcl2,pcl4 --seeds 0,1,2
run --rows hier4-late --seeds 0,1,2
.venv/bin/python benchmarks/long_gates.py "$OUT"
