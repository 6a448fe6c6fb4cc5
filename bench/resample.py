"""Repeat an evaluation's sampling with other sampling options (`--sample-args`) and today's QA,
without fine-tuning again.

For each seed of an existing `meddiffft evaluate` folder (SRC), the fine-tuned model is copied;
a model made before the QA's healed check gets that check's threshold, calibrated on its own fold
segmenters and labeled cases (as fine-tuning now does: `quality.healed_bound`), and one made before
`--placement learned` gets its lesions' positions from the same cases; the run's sampling
is repeated with the same seed (`meddiffft sample`). With the evaluation's own sampling options the
candidates are the same and only the QA differs (for a folder made before 2026-12-07, when every
case drew with --seed + k, see generate.sample_seed, the candidates differ too). With --pool-judges
the new lesions go into the subset's unlabeled pool images instead of its labeled cases, each
image's own lesion under a pseudo-label from another evaluation folder's real-only segmenters (as
`evaluate --backgrounds pool` does with its own; kept with --old-lesion keep); with --pool-labels
detected into every pool image where either segmenter finds a lesion, under the union of their
masks (with --old-lesion cover the new lesion is painted over that region, so it need only hold
the lesion, not agree on its outline). The result is a new evaluation folder (OUT) whose
generation units match SRC's key, so rerunning the same `evaluate` command on OUT
(bench/evaluate_busi.py --run-dir, with --seg-budget same-passes for a folder made before
2026-12-07) trains only the arms. Prints, per seed, how many pairs SRC and OUT kept.

    nice .venv/bin/python bench/resample.py --src /tmp/busi_eval/run_v1e --out /tmp/busi_eval/run_v1h \
        --seeds 0 1 2 3 4 --sample-args "--samples 4 --qa-keep 2"
    nice .venv/bin/python bench/resample.py --src /tmp/busi_eval/run_v1e --out /tmp/busi_eval/run_v1k \
        --seeds 0 1 2 3 4 --sample-args "--samples 4 --qa-keep 2 --old-lesion keep"
    nice .venv/bin/python bench/resample.py --src /tmp/busi_eval/run_v1e --out /tmp/busi_eval/run_v1p \
        --seeds 0 1 2 3 4 --sample-args "--samples 4 --qa-keep 2 --old-lesion keep --placement learned"
    nice .venv/bin/python bench/resample.py --src .busi/run_keep --out .busi/run_pool --seeds 0 1 2 3 \
        --pool-judges .busi/run_e2000 --sample-args "--samples 2 --qa-keep 1 --old-lesion keep"
    nice .venv/bin/python bench/resample.py --src .busi/run_keep --out .busi/run_pool_cover_all --seeds 0 1 \
        --pool-judges .busi/run_e2000 --pool-labels detected --sample-args "--samples 2 --qa-keep 1 --old-lesion cover"
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path

from folders import seeds_to_generate, src_out_parser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def calibrate(model_dir: Path, labeled_csv: Path) -> dict:
    """Add the healed threshold to a model folder made before the check (kept where it is there);
    returns the QA entry."""
    import torch

    from MedDiffFTLib.backbone import MODEL_CARD, read_model_card
    from MedDiffFTLib.caseio import image_key, read_case, read_cases_csv
    from MedDiffFTLib.quality import QualityFilter, healed_bound

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


def pseudo_labeled_pool(seed_dir: Path, judges_dir: Path, folder: Path, settings: dict, **options) -> Path:
    """Pseudo-label the unlabeled pool images of ``seed_dir`` with ``judges_dir``'s real-only
    segmenters of the same subset, as `meddiffft evaluate --backgrounds pool` does with its own
    (evaluate.pseudo_label, with ``options``); writes the labels and a cases CSV into ``folder``.
    Prints how many images got one and, as a diagnosis only (never used), their Dice against the
    pool's true labels."""
    import numpy as np
    import torch

    from MedDiffFTLib.caseio import read_cases_csv
    from MedDiffFTLib.evaluate import load_segmenter, write_pseudo_labels

    judges = [load_segmenter(path, torch.device("cpu")) for path in sorted(judges_dir.glob("real_only*.safetensors"))]
    if len(judges) < 2:
        sys.exit(f"{judges_dir} holds {len(judges)} real-only segmenter(s); the agreement needs 2 (--seg-repeats 2)")
    true_labels = {os.path.abspath(image): label for image, label in read_cases_csv(settings["train"])}
    folder.mkdir(parents=True, exist_ok=True)
    pool = [(image, true_labels[image]) for image, _ in read_cases_csv(str(seed_dir / "unlabeled.csv"))]
    rows, dice = write_pseudo_labels(judges, pool, folder, settings["segmenter"]["resolution"], **options)
    print(f"{seed_dir.name}: {len(rows)} of {len(pool)} pool images pseudo-labeled{f' {options}' if options else ''}; "
          f"their Dice against the true labels (diagnosis only): mean {np.mean(dice):.3f}, min {np.min(dice):.3f}",
          flush=True)
    return folder / "cases.csv"


def main() -> None:
    from MedDiffFTLib.cli import run_command
    from MedDiffFTLib.generate import SAMPLE_SEEDING
    from MedDiffFTLib.outputs import write_json

    parser = src_out_parser(__doc__, "an evaluation folder with generations", "the new evaluation folder")
    parser.add_argument("--sample-args", default="--samples 4 --qa-keep 2",
                        help="the sampling options of the evaluation's --run-args")
    parser.add_argument("--pool-judges", type=Path,
                        help="an evaluation folder of the same subsets whose real-only segmenters (2 repeats) "
                             "pseudo-label the unlabeled pool images to paint into")
    parser.add_argument("--pool-labels", choices=("agreed", "detected"), default="agreed",
                        help="with --pool-judges, the pool images painted into: agreed (those whose lesion the "
                             "judges agree on, under that pseudo-label) or detected (every image where either "
                             "judge finds a lesion, under the union of their masks: the region that "
                             "--old-lesion cover paints over); seed_S/pseudo holds the agreed ones either way")
    args = parser.parse_args()
    for seed, src, out in seeds_to_generate(args):
        for name in ("subset.json", "labeled.csv", "unlabeled.csv", "generation.json", "generation.started.json",
                     "real_only.json", "real_only.safetensors"):
            shutil.copy(src / name, out / name)
        for name in ("generation.json", "generation.started.json"):  # sampled below, so seeded as now
            record = json.loads((out / name).read_text())
            write_json(out / name, {**record, "key": {**record["key"], "sample_seeding": SAMPLE_SEEDING}})
        model = out / "model.staged"
        shutil.rmtree(model, ignore_errors=True)
        shutil.copytree(src / "generation" / "model", model)
        entry = calibrate(model, out / "labeled.csv")
        add_positions(model, out / "labeled.csv")
        shutil.rmtree(out / "generation", ignore_errors=True)
        cases = out / "labeled.csv"
        if args.pool_judges:
            judges, recorded = args.pool_judges / f"seed_{seed}", json.loads((args.src / "settings.json").read_text())
            cases = pseudo_labeled_pool(out, judges, out / "pseudo", recorded)
            if args.pool_labels == "detected":
                cases = pseudo_labeled_pool(out, judges, out / "detected", recorded, min_agreement=0.0, union=True)
        run_command(["sample", "--model", str(model), "--cases", str(cases), "--seed", str(seed),
                     "--device", "cpu", "--progress", "none", "--out", str(out / "generation"),
                     *shlex.split(args.sample_args)])
        model.rename(out / "generation" / "model")
        before = json.loads((src / "generation" / "manifest.json").read_text())["qa"]
        after = json.loads((out / "generation" / "manifest.json").read_text())["qa"]
        print(f"seed {seed}: healed threshold {entry['thresholds']['healed_max_detected']:.3f}; kept "
              f"{before['kept']} -> {after['kept']}; rejections {after['rejections_by_check']}", flush=True)


if __name__ == "__main__":
    main()
