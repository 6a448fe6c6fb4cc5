"""The segmenter's batched augmentation (`segmenter.augment`) against the per-sample MONAI transforms
it replaced (same probabilities and ranges; kept here as the baseline): real-only BUSI segmenters
trained through `meddiffft evaluate` (bench/evaluate_busi.py's protocol: K=20, 20 validation cases,
60 test cases, 64 px, 1000 epochs) on the same subsets and segmenter seeds with each augmentation.
Prints per subset the test and best-validation Dice and the seconds per segmenter, then the paired
difference (batched - MONAI) and the speed ratio.

On 2 cores, one process per augmentation at once (each single-threaded), then the comparison:
  OMP_NUM_THREADS=1 .venv/bin/python bench/segmenter_augmentation.py --work .busi --augmentation batched &
  OMP_NUM_THREADS=1 .venv/bin/python bench/segmenter_augmentation.py --work .busi --augmentation monai &
  wait; .venv/bin/python bench/segmenter_augmentation.py --work .busi --compare
The split of one training step (batch 8, 64 px, random data) between augmentation and the model:
  OMP_NUM_THREADS=1 .venv/bin/python bench/segmenter_augmentation.py --step-times
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from MedDiffFTLib import segmenter  # noqa: E402


def monai_per_sample():
    """segmenter.augment's signature over MONAI's dict transforms, one sample per call (the
    library's augmentation before it was batched), seeded from the caller's generator."""
    from monai.transforms import (Compose, Rand2DElasticd, RandAdjustContrastd, RandAffined, RandFlipd,
                                  RandGaussianNoised, RandGaussianSmoothd, RandScaleIntensityd)
    from monai.utils import convert_to_tensor

    keys, modes = ("image", "mask"), ("bilinear", "nearest")
    transform = Compose([
        RandAffined(keys, prob=0.2, rotate_range=np.pi, scale_range=(0.3, 0.3), mode=modes, padding_mode="zeros"),
        Rand2DElasticd(keys, spacing=(16, 16), magnitude_range=(0.5, 1.5), prob=0.2, mode=modes,
                       padding_mode="zeros"),
        RandGaussianNoised("image", prob=0.1, std=0.1),
        RandGaussianSmoothd("image", prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0)),
        RandScaleIntensityd("image", factors=0.25, prob=0.15),
        RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5)),
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
    ])

    def augment(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator):
        transform.set_random_state(seed=int(torch.randint(2**31, (1,), generator=generator)))
        pairs = [transform({"image": i, "mask": m}) for i, m in zip(images.cpu(), masks.cpu())]
        out_images = torch.stack([convert_to_tensor(p["image"], dtype=torch.float32, track_meta=False) for p in pairs])
        out_masks = torch.stack([convert_to_tensor(p["mask"], track_meta=False) > 0.5 for p in pairs]).float()
        return out_images.to(images.device), out_masks.to(images.device)

    return augment


def compare(work: Path) -> None:
    from pool_subsets import arm_results, describe

    batched, reference = (arm_results([work / f"run_aug_{name}"], "real_only") for name in ("batched", "monai"))
    seeds = sorted(set(batched) & set(reference))
    if not seeds:
        raise SystemExit(f"no subset finished with both augmentations under {work}")

    def per_segmenter(result: dict) -> float:  # evaluate sums an arm's seconds over its repeats
        return result["seconds"] / len(result["repeats"])

    print("subset  batched test, val, s/segmenter   MONAI test, val, s/segmenter")
    for seed in seeds:
        b, m = batched[seed], reference[seed]
        print(f"{seed:6d}  {b['dice_mean']:.3f} {b['best_val_dice']:.3f} {per_segmenter(b):7.0f}"
              f"          {m['dice_mean']:.3f} {m['best_val_dice']:.3f} {per_segmenter(m):7.0f}")
    describe("Dice, batched - MONAI", {s: (batched[s]["dice_mean"] - reference[s]["dice_mean"],
                                           batched[s]["best_val_dice"] - reference[s]["best_val_dice"])
                                       for s in seeds})
    ratio = np.array([per_segmenter(reference[s]) / per_segmenter(batched[s]) for s in seeds])
    print(f"seconds per segmenter (training, validation, test): MONAI / batched = {ratio.mean():.2f} "
          f"(range {ratio.min():.2f}-{ratio.max():.2f})")


def step_times(steps: int = 200, resolution: int = 64, batch: int = 8) -> None:
    """Milliseconds per training step for each augmentation and for the model's forward/backward."""
    import time

    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    images = torch.rand(batch, 1, resolution, resolution)
    masks = (torch.rand(batch, 1, resolution, resolution) > 0.7).float()
    model = segmenter.build_model()
    optimizer, loss_fn = torch.optim.Adam(model.parameters(), 1e-3), DiceCELoss(sigmoid=True)

    def model_step(*_):
        optimizer.zero_grad()
        loss_fn(model(images), masks).backward()
        optimizer.step()

    for name, step in (("per-sample MONAI augmentation", monai_per_sample()), ("batched augmentation",
                       segmenter.augment), ("model forward + backward + Adam", model_step)):
        generator = torch.Generator().manual_seed(0)
        began = time.perf_counter()
        for _ in range(steps):
            step(images, masks, generator)
        print(f"{name}: {(time.perf_counter() - began) * 1000 / steps:.1f} ms per step "
              f"(batch {batch}, {resolution} px, {torch.get_num_threads()} thread(s))")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(".busi"), help="bench/evaluate_busi.py's WORK folder")
    parser.add_argument("--augmentation", choices=("batched", "monai"))
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=8, help="subsets")
    parser.add_argument("--seg-repeats", type=int, default=2)
    parser.add_argument("--compare", action="store_true", help="print the comparison of finished subsets")
    parser.add_argument("--step-times", action="store_true", help="time one step's augmentation and model")
    args = parser.parse_args()
    if args.step_times:
        step_times()
        return
    if args.compare:
        compare(args.work)
        return
    if args.augmentation is None:
        parser.error("pass --augmentation batched|monai (or --compare)")
    if args.augmentation == "monai":
        segmenter.augment = monai_per_sample()
    from evaluate_busi import main as evaluate_busi

    evaluate_busi(["--work", str(args.work), "--run-dir", f"run_aug_{args.augmentation}", "--arms", "real_only",
                   "--first-seed", str(args.first_seed), "--seeds", str(args.seeds),
                   "--seg-repeats", str(args.seg_repeats)])


if __name__ == "__main__":
    main()
