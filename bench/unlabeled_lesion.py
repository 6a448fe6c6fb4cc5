"""How much of a pool image's true lesion its training label leaves out: for pairs painted into
pseudo-labeled pool images (a generation folder's manifest) or pseudo-labels themselves (a cases
CSV), the share of the withheld true lesion outside the label, a real lesion that the segmenter is
taught is background. A diagnosis on the pool's own labels, which nothing trains on.

    .venv/bin/python bench/unlabeled_lesion.py --train .busi/train.csv \\
        .busi/run_pool_div/seed_0/generation .busi/run_pool_cover/seed_0/generation \\
        .busi/run_pool_cover_all/seed_0/detected/cases.csv
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def labeled_pairs(source: Path) -> list[tuple[str, str, str]]:
    """(pool image, pair image, pair label) for a generation folder or a cases CSV (image, label)."""
    from MedDiffFTLib.caseio import read_cases_csv

    if source.is_dir():
        samples = json.loads((source / "manifest.json").read_text())["samples"]
        return [(entry["background_image"], str(source / entry["image"]), str(source / entry["label"]))
                for entry in samples]
    return [(image, image, label) for image, label in read_cases_csv(str(source))]


def main() -> None:
    from MedDiffFTLib.caseio import read_case, read_cases_csv

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, required=True, help="the pool's CSV with its true labels")
    parser.add_argument("sources", type=Path, nargs="+", help="generation folders or cases CSVs")
    args = parser.parse_args()
    truth = {os.path.abspath(image): label for image, label in read_cases_csv(str(args.train))}
    for source in args.sources:
        left_out = []
        for pool_image, image, label in labeled_pairs(source):
            true = read_case(pool_image, truth[os.path.abspath(pool_image)]).foreground
            labeled = read_case(image, label).foreground
            left_out.append(1.0 - (true & labeled).sum() / max(1, true.sum()))
        left_out = np.asarray(left_out)
        print(f"{source}: {len(left_out)} pairs; true lesion outside the label: mean {left_out.mean():.3f}, "
              f"median {np.median(left_out):.3f}; over 20 %: {(left_out > 0.2).mean():.2f}, "
              f"over half: {(left_out > 0.5).mean():.2f}")


if __name__ == "__main__":
    main()
