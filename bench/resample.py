"""Repeat an evaluation's sampling with other sampling options (`--sample-args`) and today's QA,
without fine-tuning again.

For each seed of an existing `meddiffft evaluate` folder (SRC), the fine-tuned model is copied;
a model made before the QA's healed check gets that check's threshold, calibrated on its own fold
segmenters and labeled cases (as fine-tuning now does: `quality.healed_bound`), and one made before
`--placement learned` gets its lesions' positions from the same cases; the run's sampling
is repeated with the same seed (`meddiffft sample`). With the evaluation's own sampling options the
candidates are the same and only the QA differs. The result is a new evaluation folder (OUT) whose
generation units match SRC's key, so rerunning the same `evaluate` command on OUT
(bench/evaluate_busi.py --run-dir) trains only the arms. Prints, per seed, how many pairs SRC and
OUT kept.

    nice .venv/bin/python bench/resample.py --src /tmp/busi_eval/run_v1e --out /tmp/busi_eval/run_v1h \
        --seeds 0 1 2 3 4 --sample-args "--samples 4 --qa-keep 2"
    nice .venv/bin/python bench/resample.py --src /tmp/busi_eval/run_v1e --out /tmp/busi_eval/run_v1k \
        --seeds 0 1 2 3 4 --sample-args "--samples 4 --qa-keep 2 --old-lesion keep"
    nice .venv/bin/python bench/resample.py --src /tmp/busi_eval/run_v1e --out /tmp/busi_eval/run_v1p \
        --seeds 0 1 2 3 4 --sample-args "--samples 4 --qa-keep 2 --old-lesion keep --placement learned"
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def calibrate(model_dir: Path, labeled_csv: Path) -> dict:
    """Add the healed threshold to a model folder made before the check (kept where it is there);
    returns the QA entry."""
    import torch

    from MedDiffFTLib.backbone import MODEL_CARD, read_model_card
    from MedDiffFTLib.caseio import read_case, read_cases_csv
    from MedDiffFTLib.quality import QualityFilter, healed_bound, image_key

    card = read_model_card(model_dir)
    if "healed_max_detected" in card["quality"]["thresholds"]:
        return card["quality"]
    quality = QualityFilter.load(model_dir, card, torch.device("cpu"))
    by_key = {}
    for image, label in read_cases_csv(str(labeled_csv)):
        case = read_case(image, label, allow_empty=True)
        by_key[image_key(case.image)] = case
    cases = [by_key[key] for key in quality.entry["cases"]]  # the fine-tune's order and folds
    entry = card["quality"]
    entry["thresholds"]["healed_max_detected"], entry["calibration"]["tissue_detected"] = healed_bound(
        cases, quality.entry["fold_of_case"], quality.segmenters, card["slices"], quality.settings)
    (model_dir / MODEL_CARD).write_text(json.dumps(card, indent=2))
    return entry


def add_positions(model_dir: Path, labeled_csv: Path) -> None:
    """Add each mask-generator lesion's frame position to a model folder made before they were
    recorded (the same cases in the same order give the same lesions: checked by their areas)."""
    from MedDiffFTLib.backbone import read_model_card
    from MedDiffFTLib.caseio import read_case, read_cases_csv
    from MedDiffFTLib.mask_generator import FOLDER, LESIONS_FILE, collect_lesions
    from MedDiffFTLib.outputs import write_json

    path = model_dir / FOLDER / LESIONS_FILE
    stored = json.loads(path.read_text())
    if all("position" in lesion for lesion in stored["lesions"]):
        return
    card = read_model_card(model_dir)
    cases = [read_case(image, label) for image, label in read_cases_csv(str(labeled_csv))]
    _, lesions = collect_lesions(cases, card["slices"]["axis"], card["mask_generator"]["resolution"])
    if [lesion["areas"] for lesion in lesions] != [lesion["areas"] for lesion in stored["lesions"]]:
        sys.exit(f"{labeled_csv} does not give the lesions {model_dir}'s mask generator was trained on")
    write_json(path, {"lesions": lesions})


def main() -> None:
    from MedDiffFTLib.cli import run_command

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, required=True, help="an evaluation folder with generations")
    parser.add_argument("--out", type=Path, required=True, help="the new evaluation folder")
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--sample-args", default="--samples 4 --qa-keep 2",
                        help="the sampling options of the evaluation's --run-args")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.src / "settings.json", args.out / "settings.json")
    for seed in args.seeds:
        src, out = args.src / f"seed_{seed}", args.out / f"seed_{seed}"
        if (out / "generation" / "manifest.json").is_file():
            continue
        out.mkdir(exist_ok=True)
        for name in ("subset.json", "labeled.csv", "unlabeled.csv", "generation.json", "generation.started.json",
                     "real_only.json", "real_only.safetensors"):
            shutil.copy(src / name, out / name)
        model = out / "model.staged"
        shutil.rmtree(model, ignore_errors=True)
        shutil.copytree(src / "generation" / "model", model)
        entry = calibrate(model, out / "labeled.csv")
        add_positions(model, out / "labeled.csv")
        shutil.rmtree(out / "generation", ignore_errors=True)
        run_command(["sample", "--model", str(model), "--cases", str(out / "labeled.csv"), "--seed", str(seed),
                     "--device", "cpu", "--progress", "none", "--out", str(out / "generation"),
                     *shlex.split(args.sample_args)])
        model.rename(out / "generation" / "model")
        before = json.loads((src / "generation" / "manifest.json").read_text())["qa"]
        after = json.loads((out / "generation" / "manifest.json").read_text())["qa"]
        print(f"seed {seed}: healed threshold {entry['thresholds']['healed_max_detected']:.3f}; kept "
              f"{before['kept']} -> {after['kept']}; rejections {after['rejections_by_check']}", flush=True)


if __name__ == "__main__":
    main()
