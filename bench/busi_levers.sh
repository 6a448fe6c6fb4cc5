#!/usr/bin/env bash
# Texture fidelity of the compact backbone on BUSI, --scale fit vs native at an equal step budget.
# Train: 16 benign images (odd numbers 1..31); held out: benign 50..53 (never trained on).
# Usage: bash bench/busi_levers.sh [STEPS] [WORKDIR]   (about 20 CPU minutes at 695 steps on 2 cores)
set -euo pipefail
steps=${1:-695}
work=${2:-bench/output/busi}
root="$(cd "$(dirname "$0")/.." && pwd)"
data="$root/../shared/data/BUSI/benign"
py="$root/.venv/bin/python"
[ -d "$data" ] || { echo "BUSI not found at $data"; exit 1; }
mkdir -p "$work"
row() { echo "$data/images/benign ($1).png,$data/mask/benign ($1)_mask.png"; }
{ echo image,label; for i in $(seq 1 2 31); do row "$i"; done; } > "$work/train.csv"
{ echo image,label; for i in 50 51 52 53; do row "$i"; done; } > "$work/test.csv"
for scale in fit native; do
  "$root/.venv/bin/meddiffft" finetune --cases "$work/train.csv" --model-out "$work/model_$scale" \
    --train-steps "$steps" --resolution 64 --scale "$scale" --device cpu --progress none --overwrite
  "$py" "$root/bench/engine.py" texture --model "$work/model_$scale" --cases "$work/test.csv" --samples 1
done
