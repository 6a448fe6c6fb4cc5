"""Self-training, the context for synthetic pairs painted into pseudo-labeled pool images: the same
mixed arm as `meddiffft evaluate`'s real_plus_synthetic, with the pseudo-labeled pool images
themselves (bench/resample.py --pool-judges writes them to SRC/seed_S/pseudo/cases.csv) as the
extra pairs, nothing painted. Whatever the painted pairs gain beyond this arm is the generator's.
With --with-synthetic the extra pairs are those images and SRC's painted pairs together: do the
painted lesions add to the pseudo-labeled images rather than replace them?

For each seed, the arm's segmenters (one per --seg-repeats, the evaluation's segmenter settings and
seeds, the mixed arm's step budget) are trained and scored on the test cases by evaluate's own
code, and their records written as OUT/seed_S/real_plus_synthetic[.repeatR].json, so that
bench/pool_subsets.py reads OUT like an evaluation folder (real only from --baseline):

    OMP_NUM_THREADS=1 nice .venv/bin/python bench/self_training.py --src .busi/run_pool --out .busi/run_pseudo \\
        --seeds 0 1 2 3
    .venv/bin/python bench/pool_subsets.py .busi/run_pseudo --baseline .busi/run_e2000
    OMP_NUM_THREADS=1 nice .venv/bin/python bench/self_training.py --src .busi/run_pool --out .busi/run_pseudo_syn \\
        --seeds 0 1 2 3 --with-synthetic
    .venv/bin/python bench/pool_subsets.py .busi/run_pseudo_syn --baseline .busi/run_e2000 --versus .busi/run_pseudo
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import fields
from pathlib import Path

from folders import src_out_parser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    from MedDiffFTLib.caseio import read_case, read_cases_csv
    from MedDiffFTLib.evaluate import (EvaluateSettings, _Bar, _stack, _train_arm, arm_budgets, case_tensors,
                                       read_split)
    from MedDiffFTLib.segmenter import SegmenterSettings

    parser = src_out_parser(__doc__, "an evaluation folder re-sampled with --pool-judges",
                            "the folder for the self-training records")
    parser.add_argument("--with-synthetic", action="store_true",
                        help="also SRC's generated pairs (seed_S/generation), mixed in with the pseudo-labeled images")
    args = parser.parse_args()
    recorded = json.loads((args.src / "settings.json").read_text())
    names = {f.name for f in fields(EvaluateSettings)}
    settings = EvaluateSettings(**{**{k: v for k, v in recorded.items() if k in names},
                                   "segmenter": SegmenterSettings(**recorded["segmenter"])})
    split = read_split(recorded["train"], recorded["test"], settings)
    resolution = settings.segmenter.resolution

    def stacked(rows, lesion_slices_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """As evaluate stacks the real cases (plain) and the extra pairs (their lesion slices)."""
        return _stack([case_tensors(read_case(image, label), resolution, lesion_slices_only=lesion_slices_only)
                       for image, label in rows], resolution)

    by_image = {os.path.abspath(image): label for image, label in split.train}
    test = [case_tensors(read_case(image, label), resolution) for image, label in split.test]
    for seed in args.seeds:
        subset = json.loads((args.src / f"seed_{seed}" / "subset.json").read_text())
        real, validation = (stacked([(image, by_image[os.path.abspath(image)]) for image in subset[name]])
                            for name in ("labeled", "validation"))
        pseudo_csv = args.src / f"seed_{seed}" / "pseudo" / "cases.csv"
        pairs = read_cases_csv(str(pseudo_csv))
        if args.with_synthetic:
            generation = args.src / f"seed_{seed}" / "generation"
            pairs += [(str(generation / entry["image"]), str(generation / entry["label"]))
                      for entry in json.loads((generation / "manifest.json").read_text())["samples"]]
        pseudo = stacked(pairs, lesion_slices_only=True)
        steps = max(1, math.ceil(settings.seg_epochs * len(real[0]) / settings.segmenter.batch_size))
        budget = arm_budgets(steps, settings)["real_plus_synthetic"]
        key = {"arm": "real_plus_pseudo_labels", "seed": seed, "max_steps": budget,
               "segmenter": recorded["segmenter"], "pseudo_labels": hashlib.sha256(pseudo_csv.read_bytes()).hexdigest(),
               **({"with_synthetic": True} if args.with_synthetic else {})}
        seed_dir = args.out / f"seed_{seed}"
        seed_dir.mkdir(parents=True, exist_ok=True)
        result = _train_arm(seed_dir, "real_plus_synthetic", seed, key, budget, real, validation,
                            {"synthetic": pseudo}, test, settings, torch.device("cpu"), _Bar(lambda _: None))
        print(f"seed {seed}: {len(pseudo[0])} extra pairs, {budget} steps; test Dice "
              f"{result['dice_mean']:.3f} (repeats {', '.join(f'{d:.3f}' for d in result['repeats'])})", flush=True)


if __name__ == "__main__":
    main()
