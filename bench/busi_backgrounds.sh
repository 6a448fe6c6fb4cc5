#!/usr/bin/env bash
# The --background lever on the BUSI evaluation: the same fine-tuned generators as the keep runs,
# sampling again (bench/resample.py) into BUSI's 10 lesion-free "normal" images instead of each
# case's own image, then only the real + synthetic arm trains (real only is copied).
# Subsets 0-4 come from /tmp/busi_eval/run_v1e (its run-args lack --old-lesion keep), 5-15 from
# run_v1k2; results go to run_v1b and run_v1b2, compared with bench/pool_subsets.py.
# Usage (two at once on 2 cores, ~15 min per subset on one core):
#   OMP_NUM_THREADS=1 nice bash bench/busi_backgrounds.sh 0 2 4 ... & OMP_NUM_THREADS=1 nice bash bench/busi_backgrounds.sh 1 3 5 ...
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="$root/.venv/bin/python"
work=${WORK:-/tmp/busi_eval}
normal="$(cd "$root/../shared/data/BUSI/normal/images" && pwd)"
backgrounds=""
for n in $(seq 1 10); do backgrounds="$backgrounds --background '$normal/normal ($n).png'"; done
generator="--resolution 64 --scale fit --train-steps 800 --pretrain-steps 400 --batch-size 4 --samples 4 --qa-keep 2"
for seed in "$@"; do
  if [ "$seed" -lt 5 ]; then src=run_v1e; out=run_v1b; run_args="$generator"
  else src=run_v1k2; out=run_v1b2; run_args="$generator --old-lesion keep"; fi
  "$py" "$root/bench/resample.py" --src "$work/$src" --out "$work/$out" --seeds "$seed" \
    --sample-args "--samples 4 --qa-keep 2 --old-lesion keep $backgrounds"
  "$py" "$root/bench/evaluate_busi.py" --work "$work" --run-dir "$out" --first-seed "$seed" --seeds 1 \
    --arms real_only,real_plus_synthetic --run-args "$run_args"
done
