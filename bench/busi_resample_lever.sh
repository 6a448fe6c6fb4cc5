#!/usr/bin/env bash
# A sampling lever on the BUSI evaluation, without fine-tuning again: the same generators as the
# keep runs (subsets 0-4 from /tmp/busi_eval/run_v1e, whose run-args lack --old-lesion keep; 5-15
# from run_v1k2) sample again (bench/resample.py) with the lever's options, then only the
# real + synthetic arm trains (real only is copied). Compare with bench/pool_subsets.py against
# run_v1k + run_v1k2 (keep, the bench default).
#   backgrounds: paint into BUSI's 10 lesion-free "normal" images instead of each case's own image
#                (out: run_v1b, run_v1b2)
#   more-pairs:  8 candidates per case, the QA keeps the best 4 (keep's 4 candidates are its first
#                4: same seeds), so up to 4 pairs per real case instead of 2 (out: run_v1m, run_v1m2)
# Usage (two at once on 2 cores; 10-25 min per subset on one core):
#   OMP_NUM_THREADS=1 nice bash bench/busi_resample_lever.sh backgrounds 0 2 4 ... &
#   OMP_NUM_THREADS=1 nice bash bench/busi_resample_lever.sh backgrounds 1 3 5 ...
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="$root/.venv/bin/python"
work=${WORK:-/tmp/busi_eval}
lever=$1; shift
case "$lever" in
  backgrounds)
    normal="$(cd "$root/../shared/data/BUSI/normal/images" && pwd)"
    sample_args="--samples 4 --qa-keep 2 --old-lesion keep"
    for n in $(seq 1 10); do sample_args="$sample_args --background '$normal/normal ($n).png'"; done
    out=run_v1b ;;
  more-pairs) sample_args="--samples 8 --qa-keep 4 --old-lesion keep"; out=run_v1m ;;
  *) echo "unknown lever $lever: backgrounds or more-pairs"; exit 2 ;;
esac
generator="--resolution 64 --scale fit --train-steps 800 --pretrain-steps 400 --batch-size 4 --samples 4 --qa-keep 2"
for seed in "$@"; do
  if [ "$seed" -lt 5 ]; then src=run_v1e; dst=$out; run_args="$generator"
  else src=run_v1k2; dst=${out}2; run_args="$generator --old-lesion keep"; fi
  "$py" "$root/bench/resample.py" --src "$work/$src" --out "$work/$dst" --seeds "$seed" --sample-args "$sample_args"
  "$py" "$root/bench/evaluate_busi.py" --work "$work" --run-dir "$dst" --first-seed "$seed" --seeds 1 \
    --arms real_only,real_plus_synthetic --run-args "$run_args"
done
