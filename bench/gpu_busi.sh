#!/usr/bin/env bash
# The BUSI evaluation (bench/evaluate_busi.py) on a lent GPU machine: one process per K-subset, all
# at once on the one GPU, then one pass that collects them into WORK/run/report.*.
#
# Prepare on the workstation (the GPU machine has no network and no ../shared/data):
#   .venv/bin/python bench/evaluate_busi.py --work .busi --max-side 256 --prepare-only
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl diffusers==0.42.1 monai==1.6.1 pynrrd==1.1.3 importlib_metadata
#   SimpleITK 2.5.7's wheel (53 MB) unpacked and repacked as .whl/sitk.tar.xz (28 MB) to fit the transfer.
# Run there (device tool, carry [".busi", ".whl"]):  bash bench/gpu_busi.sh SUBSETS SECONDS_PER_SUBSET
# Results: OUT/report.tgz (report.*, plots, logs) and OUT/seed_S.tgz (each subset's folder without
# the backbone weights), so the report can be rebuilt anywhere with
#   bench/evaluate_busi.py --work .busi --seeds SUBSETS (same RUN_ARGS and --seg-epochs).
#
# Measured 2026-11-27 on a lent H100 (6 subsets at once, RUN_ARGS below, 400 s each): no subset got
# past sampling. Every stage is CPU-bound per process (bench/gpu_stage_speeds.sh, H200: backbone
# 17.5 steps/s alone and 17.5 each with 3 at once, 13.8 each with 6; mask generator 35 steps/s;
# segmenter with augmentation ~20 steps/s, likely held by MONAI's per-sample transforms, batched since
# 2026-12 and not yet timed on a GPU; sampling 2-4 s per candidate with 6 at once), so one
# subset needs ~14 min: cut --train-steps/--samples/--seg-epochs, or split it over two calls on one
# warm machine (carry .busi again the second time: on 2026-11-28 a call that carried nothing found
# no .busi on the warm machine): evaluate keeps finished units and an interrupted fine-tune
# continues from its last checkpoint (`run --resume`); sampling starts again.
#
# Measured 2026-11-27 on a lent H200, generation only (bench/RESULTS.md's native-scale row):
#   GENERATE_ONLY=1 RUN_ARGS="--resolution 64 --pretrain-steps 500 --train-steps 1300 --train-minutes 2.5
#     --mask-steps 600 --samples 4 --qa-keep 2 --qa-segmenter-steps 400 --sampling-steps 20" bash bench/gpu_busi.sh 5 520
# (carry .busi/cases .busi/masks .busi/train.csv .busi/test.csv .whl): all 5 generations in 351 s
# (308-322 s each: 1800 backbone steps in ~139 s at 13 steps/s, mask generator 26 s, then the QA's
# fold segmenters and 80 candidates); 38 s more for the machine's start and the transfers. Then on
# the workstation: untar OUT/seed_S.tgz into .busi/run/, copy OUT/report.tgz's settings.json there,
# and run bench/evaluate_busi.py --work .busi --arms real_only,real_plus_synthetic --run-args "SAME".
# Measured 2026-11-28 on a lent H200, the default RUN_ARGS (keep): GENERATE_ONLY=1 bash
# bench/gpu_busi.sh 7 530, then FIRST=7 ... 7 390 on the same warm machine: 7 generations at once in
# 326 s (280-299 s each), then 7 more in 315 s; 14 subsets in 12.3 min of device time with the start.
set -u
SUBSETS=${1:-6}
LIMIT=${2:-400}
FIRST=${FIRST:-0}  # the subsets are seeds FIRST .. FIRST + SUBSETS - 1
SEEDS=$(seq "$FIRST" $((FIRST + SUBSETS - 1)))
WORK=${WORK:-.busi}
OUT=${OUT:-/tmp/gpu_busi}
# GENERATE_ONLY=1: each subset stops once its generation is recorded (no smoke runs, no arms); the
# seed_S.tgz then hold the generations, and the arms train on any machine with the same command.
# A dry run of the mechanics on a CPU workstation: PYTHON=.venv/bin/python DEVICE=cpu SEG_EPOCHS=2
#   RUN_ARGS="--resolution 32 --model-size tiny --train-steps 3 --pretrain-steps 3 --qa off" bash bench/gpu_busi.sh 2 300
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
SEG_EPOCHS=${SEG_EPOCHS:-1000}
# default: the measured native-scale generator (fits one call with 5 subsets), with the old lesion kept
RUN_ARGS=${RUN_ARGS:-"--resolution 64 --pretrain-steps 500 --train-steps 1300 --train-minutes 2.5 --mask-steps 600 --samples 4 --qa-keep 2 --qa-segmenter-steps 400 --sampling-steps 20 --old-lesion keep"}
mkdir -p "$OUT" /tmp/site
export PYTHONUNBUFFERED=1
if ! $PYTHON -c "import diffusers, monai, SimpleITK, nrrd" 2>/dev/null; then
  tar -xJf .whl/sitk.tar.xz -C /tmp/site &&
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
$PYTHON -c "import torch, diffusers, monai, SimpleITK; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 1

EVAL=(bench/evaluate_busi.py --work "$WORK" --seg-epochs "$SEG_EPOCHS" --device "$DEVICE"
      --arms real_only,real_plus_synthetic,real_plus_copy_paste --run-args "$RUN_ARGS")
SHARES=$SUBSETS
[ -n "${GENERATE_ONLY:-}" ] || SHARES=$((SUBSETS + 1))  # the smoke runs take one share of the cores
THREADS=$(( $(nproc) / SHARES ))
THREADS=$(( THREADS > 0 ? THREADS : 1 ))
started=$(date +%s)

# Tiny runs through every stage on the GPU, beside the real ones, so a failure shows within a minute:
# with QA (a 3-step model may rightly have every sample rejected: an error, not a crash) and without.
smokes=()
for qa in $([ -n "${GENERATE_ONLY:-}" ] || echo on off); do
  OMP_NUM_THREADS=$THREADS $PYTHON -m MedDiffFTLib.cli evaluate --train "$WORK/train.csv" --test "$WORK/test.csv" \
    --out "/tmp/smoke_$qa" --k 4 --validation-cases 2 --seeds 1 --seg-epochs 2 --resolution 32 --device "$DEVICE" \
    --arms real_only,real_plus_synthetic --progress none --run-args "--resolution 32 --model-size tiny \
    --pretrain-steps 3 --train-steps 3 --mask-steps 3 --qa-segmenter-steps 3 --sampling-steps 2 --qa $qa" \
    > "$OUT/smoke_$qa.log" 2>&1 &
  smokes+=($!)
done
pids=()
for s in $SEEDS; do
  OMP_NUM_THREADS=$THREADS timeout "$LIMIT" $PYTHON "${EVAL[@]}" --run-dir "run_$s" --first-seed "$s" --seeds 1 \
    > "$OUT/subset_$s.log" 2>&1 &
  pids[$s]=$!
done
if [ -n "${GENERATE_ONLY:-}" ]; then
  running=1
  while [ "$running" = 1 ]; do
    running=0
    for s in $SEEDS; do
      if [ -f "$WORK/run_$s/seed_$s/generation.json" ]; then kill "${pids[$s]}" 2>/dev/null
      elif kill -0 "${pids[$s]}" 2>/dev/null; then running=1; fi
    done
    sleep 5
  done
  echo "generations done after $(( $(date +%s) - started )) s"
else
  wait "${smokes[@]}"
  if grep -q Traceback "$OUT"/smoke_*.log; then
    echo "SMOKE FAILED after $(( $(date +%s) - started )) s"; tail -40 "$OUT"/smoke_*.log
    kill "${pids[@]}" 2>/dev/null; exit 1
  fi
  echo "smokes passed after $(( $(date +%s) - started )) s: $(grep -hv -i warn "$OUT"/smoke_*.log | tail -n2)"
fi
for pid in "${pids[@]}"; do wait "$pid"; done
echo "subsets done after $(( $(date +%s) - started )) s"
mkdir -p "$WORK/run"
cp "$(ls "$WORK"/run_*/settings.json | head -1)" "$WORK/run/"
for s in $SEEDS; do
  echo "== subset $s: $(tail -1 "$OUT/subset_$s.log")"
  grep -h Traceback -A30 "$OUT/subset_$s.log" | tail -8
  rm -rf "$WORK/run/seed_$s" && cp -r "$WORK/run_$s/seed_$s" "$WORK/run/" 2>/dev/null
done
if [ -n "${GENERATE_ONLY:-}" ]; then
  ls "$WORK"/run/seed_*/generation.json | tee "$OUT/collect.log"
elif [ "$(grep -l 'exit 0 after' "$OUT"/subset_*.log | wc -l)" -eq "$SUBSETS" ]; then
  OMP_NUM_THREADS=8 timeout 100 $PYTHON "${EVAL[@]}" --first-seed "$FIRST" --seeds "$SUBSETS" > "$OUT/collect.log" 2>&1
  tail -3 "$OUT/collect.log"
  cat "$WORK/run/report.md" 2>/dev/null
else  # collecting would start the unfinished subsets afresh in WORK/run
  echo "not every subset finished: run this script again (carrying nothing) and they continue" | tee "$OUT/collect.log"
fi
for s in $SEEDS; do
  tar -czf "$OUT/seed_$s.tgz" -C "$WORK/run" --exclude "generation/model" --exclude ".generation.partial" --exclude "real_plus_*.safetensors" \
    "seed_$s" 2>/dev/null
done
tar -czf "$OUT/report.tgz" -C "$WORK/run" --ignore-failed-read report.json report.md dice_per_seed.png \
  samples_grid.png loss_curves.png settings.json -C "$OUT" smoke_on.log smoke_off.log collect.log $(cd "$OUT" && ls subset_*.log)
rm -f "$OUT"/*.log
echo "total $(( $(date +%s) - started )) s"
