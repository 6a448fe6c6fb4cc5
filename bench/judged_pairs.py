"""How the real-only segmenter (the judge) sees an evaluation's synthetic pairs, per subset.

For each seed folder with a generation and a real-only segmenter: quartiles of the judge's Dice on
the generated lesions (a kept real lesion excluded), the share it finds nothing in (Dice < 0.05),
the correlation with the QA's cross-fitted faithfulness Dice, and how many pairs
``--faithful-min-dice D`` keeps. Reads only; CPU, seconds per subset.

Usage: .venv/bin/python bench/judged_pairs.py .busi/run_nk [--min-dice 0.3] [--resolution 64]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MedDiffFTLib.evaluate import (faithful_pairs, generated_lesions, judged_dice, load_segmenter,  # noqa: E402
                                   pair_dice)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="an evaluation folder (seed_S/ with generation/ and real_only)")
    parser.add_argument("--min-dice", type=float, default=0.3, help="the --faithful-min-dice to count (0.3)")
    parser.add_argument("--resolution", type=int, default=64, help="the evaluation's segmenter resolution (64)")
    args = parser.parse_args()
    print("subset  pairs  judge Dice p10 p25 p50 p75 p90  found nothing  corr(QA)  kept at", args.min_dice)
    for seed_dir in sorted(args.run.glob("seed_*"), key=lambda p: int(p.name.split("_")[1])):
        if not (seed_dir / "real_only.safetensors").is_file():
            continue
        entries = json.loads((seed_dir / "generation" / "manifest.json").read_text())["samples"]
        lesions, kept, owner = generated_lesions(seed_dir / "generation", entries, args.resolution)
        dice = judged_dice(load_segmenter(seed_dir / "real_only.safetensors", torch.device("cpu")), lesions, kept)
        per_pair = pair_dice(dice, owner, len(entries))
        qa = np.array([e["qa"]["faithfulness_dice"] if e.get("qa", {}).get("faithfulness_dice") is not None
                       else np.nan for e in entries])
        both = np.isfinite(qa) & np.isfinite(per_pair)
        corr = np.corrcoef(qa[both], per_pair[both])[0, 1] if both.sum() > 2 else float("nan")
        quartiles = " ".join(f"{q:.2f}" for q in np.nanpercentile(per_pair, [10, 25, 50, 75, 90]))
        used = len(faithful_pairs(per_pair, args.min_dice))
        print(f"{seed_dir.name.split('_')[1]:>6}  {len(entries):>5}  {quartiles:>26}  "
              f"{(per_pair < 0.05).mean():>13.2f}  {corr:>8.2f}  {used}")


if __name__ == "__main__":
    main()
