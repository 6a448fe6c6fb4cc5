#!/usr/bin/env bash
# Stage speeds of `meddiffft run` on a lent GPU (BUSI K=20 from a bench/gpu_busi.sh WORK folder, 64 px,
# compact backbone): one process alone, then three at once on the same GPU (the contention that
# bench/gpu_busi.sh meets with one process per subset). Also the segmenter's steps per second.
# Device tool, carry [".busi", ".whl"]:  bash bench/gpu_stage_speeds.sh
set -u
mkdir -p /tmp/site
tar -xJf .whl/sitk.tar.xz -C /tmp/site &&
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
RUN=(run --cases .busi/k20.csv --unlabeled-cases .busi/pool.csv --resolution 64 --pretrain-steps 300
     --train-steps 600 --samples 1 --device cuda --overwrite)
echo "== one process"
OMP_NUM_THREADS=8 timeout 85 python3 bench/stage_times.py "${RUN[@]}" --out /tmp/one 2>&1 | grep -v -i warn | tail -9
echo "== three processes at once"
for i in 1 2 3; do
  OMP_NUM_THREADS=4 timeout 85 python3 bench/stage_times.py "${RUN[@]}" --out "/tmp/three_$i" > "/tmp/three_$i.log" 2>&1 &
done
wait
for i in 1 2 3; do grep -v -i warn "/tmp/three_$i.log" | tail -9; done
echo "== segmenter (strong augmentation, batch 8, 64 px)"
OMP_NUM_THREADS=8 timeout 40 python3 - <<'PY'
import time, torch
from MedDiffFTLib.segmenter import SegmenterSettings, train_segmenter
images, masks = torch.rand(20, 1, 64, 64), (torch.rand(20, 1, 64, 64) > 0.7).float()
for steps in (50, 550):
    began = time.monotonic()
    train_segmenter(images, masks, SegmenterSettings(resolution=64, max_steps=steps), device=torch.device("cuda"))
    print(steps, "steps", round(time.monotonic() - began, 1), "s")
PY
