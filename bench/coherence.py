"""Slice-to-slice coherence of generated volumes, per --slice-coherence mode, on MSD Hippocampus.

    nice -n 10 python bench/coherence.py --out /tmp/coherence [--train 6 --eval 4 --samples 2
        --train-steps 400 --model-size small --resolution 32 --modes independent,propagate --strengths 0.7
        --finetune-args "--context-slices 1"]

Fine-tunes once on the first --train volumes (sorted names), then regenerates the hippocampus
(--mask-source label, both labels as one foreground) of the next --eval volumes in place with every
mode and the same seeds (``--finetune-args`` adds fine-tune options, e.g. "--context-slices 1",
which sampling reads from the model: compare such arms in separate --out folders). Inside the real
hippocampus mask it compares the statistics of MedDiffFTLib.coherence on each synthetic volume with
the same statistic on the real volume:
adjacent-slice correlation, through-plane / in-plane squared-step ratio, and roughness of the
per-slice mean profile. Prints and writes OUT/coherence.json: per mode the median over (volume,
sample) of each statistic and of its absolute distance to the real value (lower = more like real).
Name the machine when you report; results depend only on seeds, not on load.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "MSD-Task04-Hippocampus"


def volumes(count: int, skip: int = 0) -> list[tuple[Path, Path]]:
    images = sorted((DATA / "imagesTr").glob("hippocampus_*.nii.gz"))[skip:skip + count]
    return [(image, DATA / "labelsTr" / image.name) for image in images]


def array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def main() -> None:
    from MedDiffFTLib.cli import run_command
    from MedDiffFTLib.coherence import coherence

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--train", type=int, default=6)
    parser.add_argument("--eval", type=int, default=4)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--model-size", default="small")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--sampling-steps", type=int, default=25)
    parser.add_argument("--modes", default="independent,propagate")
    parser.add_argument("--strengths", default="0.7",
                        help="--strength values tried with propagate (comma-separated)")
    parser.add_argument("--finetune-args", default="", metavar="'ARGS'",
                        help="extra `meddiffft finetune` options (they win over the bench's own), "
                             "e.g. '--context-slices 1' or '--seed 1'")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} is missing: this benchmark needs the MSD Hippocampus volumes.")
    common = ["--device", "cpu", "--progress", "none", "--seed", "0"]
    model = args.out / "model"
    if not (model / "meddiffft.json").is_file():
        train = [a for image, label in volumes(args.train) for a in ("--image", image, "--label", label)]
        run_command(["finetune", *train, "--model-out", model, "--model-size", args.model_size,
                     "--resolution", args.resolution, "--train-steps", args.train_steps,
                     "--qa", "off", "--mask-steps", "0", *common, *shlex.split(args.finetune_args)])
    configurations = []
    for mode in args.modes.split(","):
        strengths = args.strengths.split(",") if mode == "propagate" else ["0.7"]
        configurations += [(mode, strength) for strength in strengths]
    rows = {f"{m}@{s}" if m == "propagate" else m: [] for m, s in configurations}
    real_rows = []
    for image, label in volumes(args.eval, skip=args.train):
        real, mask = array(image), array(label) > 0
        real_stats = coherence(real, mask, 0)
        real_rows.append(real_stats)
        for mode, strength in configurations:
            name = f"{mode}@{strength}" if mode == "propagate" else mode
            out = args.out / name / image.name.split(".")[0]
            if not (out / "manifest.json").is_file():
                run_command(["sample", "--model", model, "--image", image, "--label", label, "--out", out,
                             "--samples", args.samples, "--sampling-steps", args.sampling_steps,
                             "--mask-source", "label", "--slice-coherence", mode, "--strength", strength,
                             "--qa", "off", "--erode", "0", *common])
            for entry in json.loads((out / "manifest.json").read_text())["samples"]:
                stats = coherence(array(out / entry["image"]), mask, 0)
                rows[name].append({**stats, **{f"{k}_distance": abs(v - real_stats[k]) for k, v in stats.items()}})
    summary = {"real": {k: float(np.median([r[k] for r in real_rows])) for k in real_rows[0]}}
    for name, values in rows.items():
        summary[name] = {k: round(float(np.median([v[k] for v in values])), 4) for k in values[0]}
    report = {"settings": vars(args) | {"out": str(args.out)}, "machine": platform.processor() or platform.machine(),
              "volumes": [p[0].name for p in volumes(args.eval, skip=args.train)], "summary": summary}
    (args.out / "coherence.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
