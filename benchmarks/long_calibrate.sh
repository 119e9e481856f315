#!/usr/bin/env bash
# Stage 1 of the long-schedule study (issue 28; ../shared/research/regime.md §5): the single model at 0 and
# 40 % noise, seed 0, for each augmentation x weight decay. Order: flip/5e-4 ran first (the old study's
# regularisation); it memorised under 10 % of the flipped labels by epoch 75, so the least regularised
# configuration (no augmentation, 1e-4) runs next: the one most likely to pass G1/G2.
# Resumable cell by cell (benchmarks/paper.py skips finished cells); run it in the background:
#   nohup nice -n 19 benchmarks/long_calibrate.sh 2 > /tmp/long_calibrate.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${1:-2}
for cfg in flip:0.0005 none:0.0001 none:0.0005 flip:0.0001; do
    aug=${cfg%%:*} wd=${cfg##*:}
    .venv/bin/python benchmarks/paper.py --dataset fashion-mnist-long --rows single --noise 0,0.4 --seeds 0 \
        --aug "$aug" --weight-decay "$wd" --jobs "$JOBS" \
        --out "benchmarks/results/paper/fashion-mnist-long/calib/$aug-wd$wd"
done
