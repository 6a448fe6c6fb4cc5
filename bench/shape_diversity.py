"""How varied the generated lesions' outlines are: per seed of an evaluation folder, the shape
diversity (evaluate.shape_diversity: mean 1 - IoU over pairs of box-scaled outlines) of the
generated lesions over that of the K labeled lesions, the report's shape_diversity_ratio, and how
many distinct mask seeds drew them. Before 2026-12-07 every case's sample k drew with --seed + k,
so the lesions of one subset had a few outlines whatever the number of cases:

    .venv/bin/python bench/shape_diversity.py .busi/run_pool .busi/run_pool_div --seeds 0 1 2 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from MedDiffFTLib.caseio import read_case, read_cases_csv
    from MedDiffFTLib.evaluate import _stack, case_tensors, generated_lesions, shape_diversity_ratio

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", type=Path, nargs="+", help="evaluation folders with seed_S/generation")
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    args = parser.parse_args()
    for folder in args.folders:
        resolution = json.loads((folder / "settings.json").read_text())["segmenter"]["resolution"]
        ratios, seeds = [], []
        for seed in args.seeds:
            seed_dir = folder / f"seed_{seed}"
            entries = json.loads((seed_dir / "generation" / "manifest.json").read_text())["samples"]
            (_, generated), _, _ = generated_lesions(seed_dir / "generation", entries, resolution)
            _, real = _stack([case_tensors(read_case(image, label), resolution, lesion_slices_only=True)
                              for image, label in read_cases_csv(str(seed_dir / "labeled.csv"))], resolution)
            ratios.append(shape_diversity_ratio(generated, real))
            seeds.append(f"{len({entry['mask_seed'] for entry in entries})}/{len(entries)}")
        print(f"{folder}: shape diversity ratio {np.mean(ratios):.2f} (per seed "
              f"{', '.join(f'{r:.2f}' for r in ratios)}); distinct mask seeds / pairs per seed: "
              f"{', '.join(seeds)}", flush=True)


if __name__ == "__main__":
    main()
