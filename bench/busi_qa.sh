#!/usr/bin/env bash
# Quality assessment on BUSI: fine-tune on 16 benign images (odd numbers 1..31; builds the quality
# reference), then paint 4 candidates per case into 2 training images and 2 held-out ones
# (benign 50, 51) and keep the 2 best passing of each; prints the manifest's QA summary.
# Usage: bash bench/busi_qa.sh [STEPS] [WORKDIR] [INIT_MODEL]   (INIT_MODEL: continue a fine-tuned
# model folder for STEPS more steps instead of training from scratch)
set -euo pipefail
steps=${1:-1000}
work=${2:-bench/output/busi_qa}
init=${3:-}
root="$(cd "$(dirname "$0")/.." && pwd)"
data="$root/../shared/data/BUSI/benign"
[ -d "$data" ] || { echo "BUSI not found at $data"; exit 1; }
mkdir -p "$work"
row() { echo "$data/images/benign ($1).png,$data/mask/benign ($1)_mask.png"; }
{ echo image,label; for i in $(seq 1 2 31); do row "$i"; done; } > "$work/train.csv"
{ echo image,label; for i in 1 3 50 51; do row "$i"; done; } > "$work/sample.csv"
M="nice -n 10 $root/.venv/bin/meddiffft"
$M finetune --cases "$work/train.csv" --model-out "$work/model" --train-steps "$steps" --mask-steps 0 \
  --resolution 64 ${init:+--init-model "$init"} --device cpu --progress none --overwrite
$M sample --model "$work/model" --cases "$work/sample.csv" --mask-source label --samples 4 --qa-keep 2 \
  --out "$work/samples" --device cpu --progress none --overwrite
"$root/.venv/bin/python" - "$work/samples/manifest.json" <<'PY'
import json, sys
manifest = json.load(open(sys.argv[1]))
qa = manifest["qa"]
print(json.dumps({k: qa[k] for k in ("kept", "rejected", "rejections_by_check", "thresholds")}, indent=1))
for entry in manifest["rejected"]:
    print(entry["source_image"].rsplit("/", 1)[-1], "seed", entry["seed"], ":", entry["reason"])
PY
