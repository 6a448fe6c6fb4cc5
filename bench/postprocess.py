"""Does keeping only the largest predicted lesion change an evaluation's delta? (nnU-Net picks this
post-processing on validation.) Re-scores every saved segmenter of `meddiffft evaluate` folders on
their validation and test cases, with and without keeping the largest connected component, holes
filled (`masks.largest_component`; MONAI's KeepLargestConnectedComponent needs scikit-image, not a
dependency), and prints
each arm's Dice and the delta (real + synthetic minus real only), pooled over the subsets.

Keep pairs add a second lesion beside the real one, and BUSI cases hold one: a segmenter trained
on them may find extra lesions that are not there (the mixed arm's HD95 rose, 14.8 -> 15.9 px).

    .venv/bin/python bench/postprocess.py .busi/run_keep --train .busi/train.csv --test .busi/test.csv
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from MedDiffFTLib.caseio import read_case, read_cases_csv  # noqa: E402
from MedDiffFTLib.evaluate import case_tensors, load_segmenter, unit_name  # noqa: E402
from MedDiffFTLib.masks import largest_component  # noqa: E402
from MedDiffFTLib.segmenter import dice_per_image, predict  # noqa: E402

ARMS = ("real_only", "real_plus_synthetic")


def labels_of(csv_path: Path) -> dict[str, str]:
    """image path (resolved) -> label path, as `evaluate` read them."""
    return {str(Path(image).resolve()): label for image, label in read_cases_csv(str(csv_path))}


def case_dice(model: torch.nn.Module, cases: list, largest: bool) -> float:
    """Mean over cases of the Dice over each case's slices, as evaluate scores them."""
    dice = []
    for images, masks in cases:
        prediction = predict(model, images)
        if largest:
            prediction = torch.from_numpy(np.stack([largest_component(plane[0].numpy())[None]
                                                    for plane in prediction]))  # holes filled too
        dice.append(float(dice_per_image(prediction.reshape(1, 1, -1, prediction.shape[-1]),
                                         masks.bool().reshape(1, 1, -1, masks.shape[-1]))[0]))
    return float(np.mean(dice))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train_labels, test_labels = labels_of(args.train), labels_of(args.test)
    rows = []  # (run, seed, split, largest) -> {arm: dice averaged over repeats}
    for run in args.runs:
        settings = json.loads((run / "settings.json").read_text())
        resolution, repeats = settings["segmenter"]["resolution"], settings["seg_repeats"]
        test = [case_tensors(read_case(image, label), resolution) for image, label in test_labels.items()]
        for seed_dir in sorted(run.glob("seed_*"), key=lambda p: int(p.name.split("_")[1])):
            validation_images = json.loads((seed_dir / "subset.json").read_text())["validation"]
            validation = [case_tensors(read_case(image, train_labels[str(Path(image).resolve())]), resolution)
                          for image in validation_images]
            for split, cases in (("validation", validation), ("test", test)):
                for largest in (False, True):
                    dice = {arm: np.mean([case_dice(load_segmenter(seed_dir / f"{unit_name(arm, r)}.safetensors",
                                                                   torch.device("cpu")), cases, largest)
                                          for r in range(repeats)]) for arm in ARMS}
                    rows.append({"run": run.name, "seed": seed_dir.name, "split": split, "largest": largest, **dice})
            line = [f"{r['split'][:4]}{'+LCC' if r['largest'] else ''}: "
                    f"{r['real_only']:.3f} {r['real_plus_synthetic']:.3f}"
                    for r in rows[-4:]]
            print(run.name, seed_dir.name, " | ".join(line), flush=True)
    for split in ("validation", "test"):
        for largest in (False, True):
            chosen = [r for r in rows if r["split"] == split and r["largest"] == largest]
            real = np.array([r["real_only"] for r in chosen])
            mixed = np.array([r["real_plus_synthetic"] for r in chosen])
            delta = (mixed - real) * 100
            print(f"{split:10s} largest component {'on ' if largest else 'off'}: real only {real.mean():.3f}, "
                  f"with synthetic {mixed.mean():.3f}, delta {delta.mean():+.2f} +- {delta.std(ddof=1):.2f} points "
                  f"(p = {stats.ttest_rel(mixed, real).pvalue:.3f}, {int((delta > 0).sum())} of {len(delta)} gained)")


if __name__ == "__main__":
    main()
