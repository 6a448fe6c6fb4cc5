"""Benchmark `meddiffft evaluate` on BUSI (benign + malignant) from ../shared/data.

Split: duplicates (same file content) removed, images with several mask files get their masks
merged (union, written under WORK/masks/), then a fixed random 60-image test set (30 benign, 30
malignant) and the rest as the training pool. Arms: real only with strong augmentation (a), the same
+ synthetic pairs (b), real without strong augmentation (a0), real + copy-paste pairs (c: the K
lesions pasted into the backgrounds the generator paints into; since 2026-12-07 with --backgrounds
pool the pseudo-labeled pool images, before into the labeled cases), real + the pseudo-labeled
pool images (self-training, the context for --backgrounds pool) and real + those images and the
synthetic pairs together (beside self-training: the generator's share).

Usage (a run folder is resumable; a larger --seeds reuses finished seeds; the defaults are the
protocol of bench/RESULTS.md's best synthetic setting by validation: 5 subsets, 1000 segmenter epochs,
every arm the same steps, half of each batch synthetic, the 400 + 800-step generator painting into
the pseudo-labeled pool images with --old-lesion cover, a new lesion painted over each image's own;
QA with the healed check; two segmenter seeds per arm and subset, averaged; before 2026-12-07 the
default painted into the labeled cases, then beside the pool image's lesion, --old-lesion keep):
  nice -n 10 .venv/bin/python bench/evaluate_busi.py --work /tmp/busi_eval
On 2 cores: two processes (--first-seed 0 --seeds 3, --first-seed 3 --seeds 2), then one plain
call collects the report (45-48 min per subset on one core of the development machine with four arms,
real only, synthetic, pseudo-labels and both: 15-17 min of it the generation; 29-33 min with
real only and synthetic; 2026-12-07).

With --max-side PX the cases are first copied, shrunk to at most PX px a side, into WORK/cases/,
and the CSVs name them relative to WORK: such a WORK folder runs anywhere (bench/gpu_busi.sh
carries one to a GPU machine). A WORK folder that already holds train.csv and test.csv is reused.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BUSI = ROOT.parent / "shared" / "data" / "BUSI"


def busi_cases(work: Path, max_side: int) -> list[tuple[str, str, str]]:
    """(image, merged mask, class) for every benign/malignant image, duplicates dropped; with
    ``max_side`` the image is a shrunk copy in WORK/cases/."""
    from PIL import Image

    (work / "masks").mkdir(parents=True, exist_ok=True)
    if max_side:
        (work / "cases").mkdir(exist_ok=True)
    seen, cases = set(), []
    for kind in ("benign", "malignant"):
        for image in sorted((BUSI / kind / "images").glob("*.png")):
            key = hashlib.sha256(image.read_bytes()).hexdigest()
            if key in seen:
                continue
            seen.add(key)
            masks = sorted((BUSI / kind / "mask").glob(f"{image.stem}_mask*.png"))
            if not masks:
                continue
            merged = work / "masks" / f"{image.stem}_mask.png"
            if not merged.exists():
                union = np.zeros(Image.open(masks[0]).size[::-1], bool)
                for mask in masks:
                    plane = np.asarray(Image.open(mask))
                    union |= (plane.max(axis=-1) if plane.ndim == 3 else plane) > 0
                Image.fromarray(union.astype(np.uint8) * 255).save(merged)
            if max_side:
                image, merged = shrunk(image, work / "cases", max_side), shrunk(merged, work / "cases", max_side)
            cases.append((str(image), str(merged), kind))
    return cases


def shrunk(path: Path, folder: Path, max_side: int) -> Path:
    """A copy of a PNG with its longer side at most ``max_side`` px (area averaging; masks re-binarized)."""
    from PIL import Image

    out = folder / path.name
    if not out.exists():
        picture = Image.open(path)
        scale = min(1.0, max_side / max(picture.size))
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        small = picture.resize(size, Image.Resampling.BOX)
        if path.stem.endswith("_mask"):
            small = small.point(lambda v: 255 if v >= 128 else 0)
        small.save(out)
    return out


def write_split(work: Path, test_per_class: int, max_side: int) -> tuple[Path, Path]:
    if (work / "train.csv").is_file() and (work / "test.csv").is_file():
        print(f"BUSI split: reusing {work / 'train.csv'} and {work / 'test.csv'}", flush=True)
        return work / "train.csv", work / "test.csv"
    cases = busi_cases(work, max_side)
    rng = np.random.default_rng(12345)
    test = []
    for kind in ("benign", "malignant"):
        rows = [case for case in cases if case[2] == kind]
        test += [rows[i] for i in rng.permutation(len(rows))[:test_per_class]]
    train = [case for case in cases if case not in test]
    for name, rows in (("train", train), ("test", test)):
        named = [(Path(i).relative_to(work), Path(m).relative_to(work)) if max_side else (i, m) for i, m, _ in rows]
        (work / f"{name}.csv").write_text("image,label\n" + "".join(f"{i},{m}\n" for i, m in named))
    print(f"BUSI split: {len(train)} training-pool cases, {len(test)} test cases", flush=True)
    return work / "train.csv", work / "test.csv"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/busi_eval")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="run seeds in parallel processes (--first-seed S --seeds 1 each), then once more "
                             "with all seeds to collect them into one report")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--test-per-class", type=int, default=30)
    parser.add_argument("--resolution", type=int, default=64, help="segmenter px")
    parser.add_argument("--seg-epochs", type=int, default=1000,
                        help="real-only validation Dice still rose at 400 (best steps near the end)")
    parser.add_argument("--seg-budget", default="same-steps",
                        help="same-steps: every arm the mixed arm's steps (the rows of bench/RESULTS.md before "
                             "2026-12-07 used same-passes, where the mixed arm trained twice as long)")
    parser.add_argument("--run-args", default="--resolution 64 --scale fit --train-steps 800 --pretrain-steps 400 "
                                              "--batch-size 4 --samples 4 --qa-keep 2 --old-lesion cover")
    parser.add_argument("--arms",
                        default="real_only,real_plus_synthetic,real_no_aug,real_plus_copy_paste,"
                                "real_plus_pseudo_labels,real_plus_pseudo_labels_and_synthetic")
    parser.add_argument("--unlabeled-pool", default="on", choices=("on", "off"))
    parser.add_argument("--synthetic-fraction", default="0.5",
                        help="share of each segmenter batch from the extra pairs (0.5, the library default, "
                             "won on validation at 1000 epochs; 0.25 at 400)")
    parser.add_argument("--synthetic-until", default="1",
                        help="share of the mixed arm's steps that draw synthetic pairs, the first ones "
                             "(1 = mixed throughout; < 1: a synthetic-first curriculum)")
    parser.add_argument("--seg-repeats", default="2",
                        help="segmenters per arm and subset, Dice averaged (the segmenter's seed alone moves "
                             "a subset's test Dice by ~2 points; the rows of bench/RESULTS.md before 2026-12 used 1)")
    parser.add_argument("--faithful-min-dice", default="0",
                        help="synthetic arm: only pairs whose generated lesion the real-only segmenter finds "
                             "at this Dice (0 = every pair the QA kept)")
    parser.add_argument("--seg-lr-schedule", default="constant",
                        help="segmenter learning rate over its steps: constant or poly (nnU-Net's decay)")
    parser.add_argument("--backgrounds", default="pool",
                        help="pool (the pseudo-labeled pool images) or labeled (the K labeled cases) to paint into")
    parser.add_argument("--seg-patience", default="0", help="validations without gain before stopping (0 = never)")
    parser.add_argument("--max-side", type=int, default=0, help="copy the cases shrunk to this many px a side")
    parser.add_argument("--prepare-only", action="store_true", help="write the split (and copies) and stop")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--run-dir", default="run", help="the evaluation folder inside WORK")
    args = parser.parse_args(argv)
    from MedDiffFTLib.cli import main as cli_main

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train, test = write_split(work, args.test_per_class, args.max_side)
    if args.prepare_only:
        return
    argv = ["evaluate", "--train", str(train), "--test", str(test), "--out", str(work / args.run_dir),
            "--k", str(args.k), "--seeds", str(args.seeds), "--seed", str(args.first_seed), "--validation-cases", "20",
            "--resolution", str(args.resolution), "--seg-epochs", str(args.seg_epochs),
            "--seg-budget", args.seg_budget,
            "--synthetic-per-real", "2", "--run-args", args.run_args, "--arms", args.arms,
            "--unlabeled-pool", args.unlabeled_pool, "--device", args.device,
            "--synthetic-fraction", args.synthetic_fraction, "--synthetic-until", args.synthetic_until,
            "--seg-patience", args.seg_patience, "--seg-lr-schedule", args.seg_lr_schedule,
            "--seg-repeats", args.seg_repeats,
            "--faithful-min-dice", args.faithful_min_dice, "--backgrounds", args.backgrounds]
    print("meddiffft " + " ".join(f"'{a}'" if " " in a else a for a in argv), flush=True)
    started = time.monotonic()
    code = cli_main(argv)
    print(f"exit {code} after {time.monotonic() - started:.0f} s; report: {work / args.run_dir / 'report.md'}",
          flush=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
