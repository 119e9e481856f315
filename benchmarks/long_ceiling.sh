#!/usr/bin/env bash
# Stage 2 of the long-schedule study (issue 28): seeds 1-3 of the single model in the calibration folder of
# the configuration stage 1 froze, so that folder holds 4 independent single runs per noise rate: gate G3
# (benchmarks/long_gates.py), the ceiling of any collaborative gain. Resumable cell by cell:
#   nohup nice -n 19 benchmarks/long_ceiling.sh flip 0.0005 2 > /tmp/long_ceiling.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
AUG=${1:?augmentation: flip or none} WD=${2:?weight decay, e.g. 0.0005} JOBS=${3:-2}
.venv/bin/python benchmarks/paper.py --dataset fashion-mnist-long --rows single --noise 0,0.4 --seeds 0,1,2,3 \
    --aug "$AUG" --weight-decay "$WD" --jobs "$JOBS" --out "benchmarks/results/paper/fashion-mnist-long/calib/$AUG-wd$WD"
.venv/bin/python benchmarks/long_gates.py "benchmarks/results/paper/fashion-mnist-long/calib/$AUG-wd$WD"
