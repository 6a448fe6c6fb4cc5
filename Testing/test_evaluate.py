"""`meddiffft evaluate`: the protocol end to end (phantoms, and BUSI when present), determinism,
resuming, the report's contents and bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import COMMON, SHARED_DATA, TRAIN_TINY
from MedDiffFTLib.caseio import read_case, read_cases_csv
from MedDiffFTLib.cli import run_command
from MedDiffFTLib.errors import MedDiffFTError
from MedDiffFTLib.evaluate import (copy_paste_cases, faithful_pairs, generated_lesions, judged_dice, kid,
                                   late_validation_gain, load_segmenter, memorization_rate, near_duplicates, pair_dice,
                                   pseudo_label, report_markdown, shape_diversity, shape_diversity_ratio,
                                   write_pseudo_labels)
from MedDiffFTLib.segmenter import train_segmenter

SEG_TINY = ["--resolution", "32", "--seg-epochs", "4", "--seg-batch-size", "2", "--validation-cases", "1"]
# label masks and no QA: a mask generator fitted on K=2 tiny phantoms may find no novel placement,
# and QA rightly rejects what a 4-step model paints
RUN_TINY = ["--run-args", " ".join(TRAIN_TINY[2:] + ["--sampling-steps", "2", "--mask-source", "label",
                                                      "--qa", "off"]),
            "--synthetic-per-real", "1"]
BUSI = SHARED_DATA / "BUSI"


def phantom_csv(directory, count: int, name: str, start: int = 0):
    """A CSV of ``count`` ultrasound-like phantom PNG cases (distinct seeds from ``start``)."""
    from PIL import Image

    from MedDiffFTLib.phantom import ultrasound_phantom

    directory.mkdir(exist_ok=True)
    rows = ["image,label"]
    for seed in range(start, start + count):
        image, mask = ultrasound_phantom(seed=seed, size=48)
        Image.fromarray(image).save(directory / f"case{seed}.png")
        Image.fromarray(mask).save(directory / f"case{seed}_mask.png")
        rows.append(f"case{seed}.png,case{seed}_mask.png")
    (directory / f"{name}.csv").write_text("\n".join(rows) + "\n")
    return directory / f"{name}.csv"


@pytest.fixture
def split(tmp_path):
    return phantom_csv(tmp_path / "data", 5, "train"), phantom_csv(tmp_path / "data", 2, "test", start=10)


def evaluate(split, out, *extra):
    train, test = split
    return run_command(["evaluate", "--train", train, "--test", test, "--out", out, "--k", "2", "--seeds", "2",
                        *SEG_TINY, *RUN_TINY, *COMMON, *extra])


def numbers(report: dict) -> dict:
    """The report without timings and memory (which vary run to run)."""
    return {key: value for key, value in report.items() if key != "timings"}


def test_evaluate_writes_a_complete_report_and_is_reproducible(split, tmp_path):
    done = evaluate(split, tmp_path / "a", "--arms", "real_only,real_plus_synthetic,real_no_aug,real_plus_copy_paste")
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    for name in ("report.md", "dice_per_seed.png", "samples_grid.png", "loss_curves.png"):
        assert (tmp_path / "a" / name).stat().st_size > 0
    for arm in ("real_only", "real_plus_synthetic", "real_no_aug", "real_plus_copy_paste"):
        assert [row["seed"] for row in report[arm]["per_seed"]] == [0, 1]
        assert report[arm]["dice_mean"] == pytest.approx(np.mean([row["dice"] for row in report[arm]["per_seed"]]))
    deltas = [b["dice"] - a["dice"] for a, b in zip(report["real_only"]["per_seed"],
                                                    report["real_plus_synthetic"]["per_seed"])]
    assert report["delta_dice_mean"] == pytest.approx(np.mean(deltas))
    assert report["delta_dice_sd"] == pytest.approx(np.std(deltas, ddof=1))
    half_width = 12.706 * np.std(deltas, ddof=1) / np.sqrt(2)  # Student's t, 1 degree of freedom, 97.5 %
    assert report["delta_dice_ci95"] == pytest.approx([np.mean(deltas) - half_width, np.mean(deltas) + half_width],
                                                      rel=1e-3)
    interval = " to ".join(f"{bound * 100:.2f}" for bound in report["delta_dice_ci95"])
    assert f"(95 % interval {interval})" in (tmp_path / "a" / "report.md").read_text()
    assert done["delta_dice_mean"] == report["delta_dice_mean"]
    for key in ("paired_p_value", "frd", "kid", "faithfulness_ratio", "memorization_rate", "shape_diversity_ratio",
                "settings", "timings"):
        assert key in report
    assert report["background_preservation"] == 1.0  # compact backbone: exact outside mask + seam
    for arm in ("real_only", "real_no_aug", "real_plus_copy_paste"):  # --seg-budget same-steps: a mixed arm's
        assert [row["steps_run"] for row in report[arm]["per_seed"]] == \
            [row["steps_run"] for row in report["real_plus_synthetic"]["per_seed"]]
    assert "every arm trained for the same steps (--seg-budget same-steps)" in \
        (tmp_path / "a" / "report.md").read_text()
    assert report["settings"]["unlabeled_pool_used"] is True and report["settings"]["k"] == 2
    histories = [json.loads((tmp_path / "a" / f"seed_{s}" / "real_only.json").read_text())["history"] for s in (0, 1)]
    assert len(histories[0]["val_dice"]) == 8  # two quarters of two checks
    assert report["real_only"]["late_val_gain_mean"] == pytest.approx(np.mean([late_validation_gain(h)
                                                                               for h in histories]))
    arms = ["real_only", "real_plus_synthetic"]
    flat = {**report, **{arm: {**report[arm], "late_val_gain_mean": 0.004} for arm in arms}}
    assert "| 0.40 |" in report_markdown(flat, arms) and "Still rising" not in report_markdown(flat, arms)
    rising = {**flat, "real_plus_synthetic": {**report["real_plus_synthetic"], "late_val_gain_mean": 0.006}}
    assert "**Still rising:** real_plus_synthetic gained more than 0.5 point" in report_markdown(rising, arms)
    assert report["near_duplicates"] == {"ncc_threshold": 0.95, "test_cases": []}  # phantoms correlate < 0.4
    assert "No test case correlates above 0.95 with a training case" in (tmp_path / "a" / "report.md").read_text()
    assert [row["copy_paste_qa"] for row in report["per_seed_synthetic"]] == [None, None]  # run with --qa off
    assert "copy-paste pairs: not filtered (no QA reference)" in (tmp_path / "a" / "report.md").read_text()
    subsets = [json.loads((tmp_path / "a" / f"seed_{s}" / "subset.json").read_text()) for s in (0, 1)]
    assert subsets[0]["labeled"] != subsets[1]["labeled"]  # a different K-subset per seed
    for subset in subsets:
        assert not set(subset["labeled"]) & set(subset["validation"])
        assert not set(subset["labeled"] + subset["validation"]) & set(subset["unlabeled"])
    again = evaluate(split, tmp_path / "b", "--arms", "real_only,real_plus_synthetic,real_no_aug,real_plus_copy_paste")
    assert numbers(json.loads((tmp_path / "b" / "report.json").read_text())) | {"settings": None} == \
        numbers(report) | {"settings": None}
    assert again["delta_dice_mean"] == done["delta_dice_mean"]


def test_an_interrupted_evaluation_continues_where_it_stopped(split, tmp_path, monkeypatch):
    out = tmp_path / "run"
    evaluate(split, out)
    first = json.loads((out / "report.json").read_text())
    (out / "seed_1" / "real_plus_synthetic.json").unlink()   # as if stopped during the last unit
    (out / "report.json").unlink()
    # seed 1's generation as if interrupted after inputs changed: its partial run is not continued
    shutil.rmtree(out / "seed_1" / "generation")
    (out / "seed_1" / "generation.json").unlink()
    (out / "seed_1" / "generation.started.json").write_text(json.dumps({"key": {"other": "inputs"}}))
    stale = out / "seed_1" / ".generation.partial" / "model" / "checkpoints" / "step-0000002"
    stale.mkdir(parents=True)
    (stale / "state.json").write_text(json.dumps({"fingerprint": "other inputs"}))  # resuming it would fail
    generated = (out / "seed_0" / "generation" / "manifest.json").stat().st_mtime_ns
    events = []
    run_command(["evaluate", "--train", split[0], "--test", split[1], "--out", out, "--k", "2", "--seeds", "2",
                 *SEG_TINY, *RUN_TINY, *COMMON], on_progress=events.append)
    assert (out / "seed_0" / "generation" / "manifest.json").stat().st_mtime_ns == generated
    assert numbers(json.loads((out / "report.json").read_text())) == numbers(first)
    assert not (out / "seed_1" / ".generation.partial").exists()
    stages = {event["stage"] for event in events if "stage" in event}
    assert stages == {"evaluate"}  # one bar over the whole run
    trained = (out / "seed_0" / "real_only.json").stat().st_mtime_ns
    mixed = (out / "seed_0" / "real_plus_synthetic.json").stat().st_mtime_ns
    evaluate(split, out, "--synthetic-fraction", "0.4")  # only the mixed arm uses the fraction
    assert (out / "seed_0" / "real_only.json").stat().st_mtime_ns == trained
    assert (out / "seed_0" / "real_plus_synthetic.json").stat().st_mtime_ns != mixed
    curriculum_args = ("--synthetic-fraction", "0.4", "--synthetic-until", "0.5")
    evaluate(split, out, *curriculum_args)  # a curriculum: fewer mixed steps, and real only's as many
    curriculum = json.loads((out / "seed_0" / "real_plus_synthetic.json").read_text())
    # 4 passes x 2 real pairs: 3 mixed steps x 1 + 3 real-only steps x 2 (8, rounded up)
    assert curriculum["key"]["segmenter"]["synthetic_until"] == 0.5 and len(curriculum["history"]["loss"]) == 6
    assert len(json.loads((out / "seed_0" / "real_only.json").read_text())["history"]["loss"]) == 6
    assert "0.4 of each batch in the first 0.5 of its steps" in (out / "report.md").read_text()
    trained = (out / "seed_0" / "real_only.json").stat().st_mtime_ns
    with monkeypatch.context() as patch:  # segmenters trained with another augmentation recipe are not reused
        patch.setattr("MedDiffFTLib.evaluate.AUGMENTATION_RECIPE", -1)
        evaluate(split, out, *curriculum_args)
    assert (out / "seed_0" / "real_only.json").stat().st_mtime_ns != trained
    trained = (out / "seed_0" / "real_only.json").stat().st_mtime_ns
    evaluate(split, out, "--seg-epochs", "3")  # new segmenter inputs: the arms are redone, not the generation
    assert (out / "seed_0" / "generation" / "manifest.json").stat().st_mtime_ns == generated
    assert (out / "seed_0" / "real_only.json").stat().st_mtime_ns != trained
    # 3 passes x 2 real pairs at 1 real pair per mixed batch: every arm 6 steps
    assert len(json.loads((out / "seed_0" / "real_only.json").read_text())["history"]["loss"]) == 3 * 2 // 1
    trained = (out / "seed_0" / "real_only.json").stat().st_mtime_ns
    evaluate(split, out, "--seg-epochs", "3", "--seg-lr-schedule", "poly")  # the decay is in every arm's key
    poly = json.loads((out / "seed_0" / "real_only.json").read_text())
    assert poly["key"]["segmenter"]["lr_schedule"] == "poly" and "lr_schedule" not in curriculum["key"]["segmenter"]
    assert (out / "seed_0" / "real_only.json").stat().st_mtime_ns != trained
    assert "(poly learning rate)" in (out / "report.md").read_text()


def test_segmenter_repeats_average_their_dice_and_keep_the_first_repeat_s_record(split, tmp_path):
    """--seg-repeats R trains each arm R times with their own segmenter seeds and averages the Dice;
    repeat 0 is the arm's plain record, so a folder from before repeats (or with fewer) is reused."""
    out = tmp_path / "run"
    evaluate(split, out, "--seeds", "1", "--seg-budget", "same-passes")
    before = json.loads((out / "report.json").read_text())
    # same passes over the real cases: half of each mixed batch is real, so twice the real-only steps
    steps = {arm: before[arm]["per_seed"][0]["steps_run"] for arm in ("real_only", "real_plus_synthetic")}
    assert steps["real_plus_synthetic"] == 2 * steps["real_only"]
    # one seed has no spread to report: unknown, not zero
    assert before["real_only"]["dice_sd"] is None and before["delta_dice_sd"] is None
    markdown = (out / "report.md").read_text()
    assert "1 seed(s)" in markdown and f"| real_only | {before['real_only']['dice_mean']:.3f} | n/a |" in markdown
    assert "Delta Dice (real + synthetic - real only): " in markdown and "+- n/a points" in markdown
    single = before["real_only"]["per_seed"][0]
    trained = (out / "seed_0" / "real_only.json").stat().st_mtime_ns
    evaluate(split, out, "--seeds", "1", "--seg-repeats", "2", "--seg-budget", "same-passes")
    assert (out / "seed_0" / "real_only.json").stat().st_mtime_ns == trained  # repeat 0 reused
    records = [json.loads((out / "seed_0" / name).read_text()) for name in ("real_only.json",
                                                                             "real_only.repeat1.json")]
    assert records[0]["history"]["loss"] != records[1]["history"]["loss"]  # another segmenter seed
    report = json.loads((out / "report.json").read_text())
    row = report["real_only"]["per_seed"][0]
    assert row["repeats"] == [single["dice"], records[1]["dice_mean"]] == [r["dice_mean"] for r in records]
    assert row["dice"] == pytest.approx(np.mean(row["repeats"]))
    assert row["best_step"] == single["best_step"]  # the first repeat's curves stand for the arm
    assert len(report["real_plus_synthetic"]["per_seed"][0]["repeats"]) == 2
    # faithfulness: the judge (repeat 0's real-only segmenter) on synthetic pairs over its own test Dice
    assert report["faithfulness_ratio"] == before["faithfulness_ratio"] == pytest.approx(
        report["per_seed_synthetic"][0]["faithfulness_dice"] / single["dice"])
    with pytest.raises(MedDiffFTError, match=r"--seeds, --synthetic-per-real, --seg-epochs and --seg-repeats "
                                             r"must be positive"):
        evaluate(split, out, "--seg-repeats", "0")


def test_bad_inputs_are_refused_before_any_work(split, tmp_path):
    train, test = split
    missing = tmp_path / "data" / "missing.csv"
    missing.write_text("image,label\ncase0.png,case0_mask.png\nnothere.png,case1_mask.png\n")
    with pytest.raises(MedDiffFTError, match=r"--train CSV row 3: file .*nothere.png not found; fix the path"):
        evaluate((missing, test), tmp_path / "out")
    with pytest.raises(MedDiffFTError, match=r"--k 5 plus 1 validation cases needs 6 training cases, but the "
                                             r"training set has 5; lower --k"):
        run_command(["evaluate", "--train", train, "--test", test, "--out", tmp_path / "out", "--k", "5",
                     *SEG_TINY, *COMMON])
    copy = tmp_path / "data" / "copy.png"
    shutil.copy(tmp_path / "data" / "case3.png", copy)
    overlapping = tmp_path / "data" / "overlap.csv"
    overlapping.write_text("image,label\ncopy.png,case3_mask.png\n")
    with pytest.raises(MedDiffFTError, match=r"Test case .*copy.png is also a training case \(.*case3.png\); "
                                             r"the test cases must be disjoint"):
        evaluate((train, overlapping), tmp_path / "out")
    with pytest.raises(MedDiffFTError, match=r"Unknown arm 'more'; use some of real_no_aug, real_only"):
        evaluate(split, tmp_path / "out", "--arms", "real_only,more")
    with pytest.raises(MedDiffFTError, match=r"A synthetic fraction of 0.9 leaves no real pair in a batch of 2; "
                                             r"lower the fraction or raise the batch size"):
        evaluate(split, tmp_path / "out", "--synthetic-fraction", "0.9")
    with pytest.raises(MedDiffFTError, match=r"--synthetic-until must be in \[0, 1\]; got -0.5"):
        evaluate(split, tmp_path / "out", "--synthetic-until", "-0.5")
    with pytest.raises(MedDiffFTError, match=r"Unknown --seg-lr-schedule 'cosine'; use one of constant, poly"):
        evaluate(split, tmp_path / "out", "--seg-lr-schedule", "cosine")
    with pytest.raises(MedDiffFTError, match=r"Unknown --seg-budget 'longer'; use one of same-steps, same-passes"):
        evaluate(split, tmp_path / "out", "--seg-budget", "longer")
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(MedDiffFTError, match=r"--out .*out is not empty and holds no evaluation"):
        evaluate(split, tmp_path / "out")


def test_near_duplicates_are_test_images_alike_a_training_image_of_their_kind():
    generator = torch.Generator().manual_seed(0)

    def scene() -> torch.Tensor:  # a smooth random 64 px image, (1, 1, 64, 64)
        return torch.nn.functional.avg_pool2d(torch.rand((1, 1, 72, 72), generator=generator), 9, stride=1)

    seen, other, unrelated = scene(), scene(), scene()
    frame = 0.8 * seen + 0.1 + 0.01 * torch.rand(seen.shape, generator=generator)  # re-exposed, noisy
    volume = seen.repeat(5, 1, 1, 1)
    found = near_duplicates([other, seen, volume], [unrelated, frame, volume + 0.01])
    assert [(test, train) for test, train, _ in found] == [(1, 1), (2, 2)]
    assert all(0.95 < ncc <= 1.0 for _, _, ncc in found)
    assert near_duplicates([other, volume], [frame]) == []  # a 2D image is never matched with a volume


def test_test_cases_alike_a_training_case_are_reported_and_scored_apart(tmp_path):
    from PIL import Image

    train = phantom_csv(tmp_path / "data", 5, "train")
    phantom_csv(tmp_path / "data", 1, "unseen", start=10)
    seen = np.asarray(Image.open(tmp_path / "data" / "case3.png"), dtype=np.float32)
    noise = np.random.default_rng(0).normal(0.0, 4.0, seen.shape)
    Image.fromarray(np.clip(seen + noise, 0, 255).astype(np.uint8)).save(tmp_path / "data" / "frame.png")
    test = tmp_path / "data" / "test.csv"
    test.write_text("image,label\ncase10.png,case10_mask.png\nframe.png,case3_mask.png\n")
    evaluate((train, test), tmp_path / "out", "--arms", "real_only,real_no_aug")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    near = report["near_duplicates"]
    assert [(row["test"], row["train"]) for row in near["test_cases"]] == \
        [(str(tmp_path / "data" / "frame.png"), str(tmp_path / "data" / "case3.png"))]
    assert near["test_cases"][0]["ncc"] > 0.95
    unseen = {arm: [json.loads((tmp_path / "out" / f"seed_{s}" / f"{arm}.json").read_text())["dice"][0]
                    for s in (0, 1)] for arm in ("real_only", "real_no_aug")}
    without = near["without_them"]
    assert without["real_only"]["dice_mean"] == pytest.approx(np.mean(unseen["real_only"]))
    assert without["real_only"]["dice_mean"] != pytest.approx(report["real_only"]["dice_mean"])
    assert without["delta_dice_real_no_aug"]["mean"] == pytest.approx(
        np.mean(np.subtract(unseen["real_no_aug"], unseen["real_only"])))
    assert without["delta_dice_real_no_aug"]["mean"] != pytest.approx(report["delta_dice_real_no_aug_mean"])
    summary = (tmp_path / "out" / "report.md").read_text()
    assert ("**Near-duplicates:** 1 of 2 test cases correlate above 0.95 with a training case as whole images"
            in summary)
    assert (f"Without them, Dice real_no_aug {without['real_no_aug']['dice_mean']:.3f}, "
            f"real_only {without['real_only']['dice_mean']:.3f}") in summary


def test_copy_paste_pastes_a_lesion_at_its_place_across_grids_and_memorization_and_kid(tmp_path):
    from PIL import Image

    donor, recipient = np.full((8, 8), 50, np.uint8), np.full((16, 16), 20, np.uint8)
    donor_mask, recipient_mask = np.zeros((8, 8), np.uint8), np.zeros((16, 16), np.uint8)
    donor[2:4, 2:4], donor_mask[2:4, 2:4] = 200, 255
    recipient_mask[12:14, 12:14] = 255
    for name, array in (("donor", donor), ("donor_mask", donor_mask), ("recipient", recipient),
                        ("recipient_mask", recipient_mask)):
        Image.fromarray(array).save(tmp_path / f"{name}.png")
    cases = [read_case(str(tmp_path / f"{name}.png"), str(tmp_path / f"{name}_mask.png"))
             for name in ("donor", "recipient")]
    pasted, scores = copy_paste_cases(cases, 1, seed=0)
    assert scores == [] and len(pasted) == 1  # no QA given
    lesion = np.zeros((16, 16), bool)
    lesion[4:8, 4:8] = True  # the donor's lesion at the same relative place on the 2x grid
    image = pasted[0].image[0]
    assert np.array_equal(image[~lesion], recipient[~lesion]) and (image[5:7, 5:7] == 200).all()
    assert (image[lesion] > 100).all()  # lesion pixels (linearly resized), none of the recipient's
    assert np.array_equal(pasted[0].foreground[0], (recipient_mask > 0) | lesion)
    assert (cases[1].image[0] == 20).all()  # the input case is not modified
    Image.fromarray(np.stack([recipient, recipient, recipient + 10], axis=-1)).save(tmp_path / "colour.png")
    colour = read_case(str(tmp_path / "colour.png"), str(tmp_path / "recipient_mask.png"))
    pasted, _ = copy_paste_cases([cases[0], colour], 1, seed=0)  # a grey lesion into a colour case
    assert pasted[0].image.shape == (1, 16, 16, 3) and (pasted[0].image[0, 5:7, 5:7] == 200).all()
    pasted, _ = copy_paste_cases(cases[:1], 6, seed=0, recipients=[cases[1], colour])  # into given recipients
    assert len(pasted) == 6 and {pair.image.shape for pair in pasted} == {(1, 16, 16), (1, 16, 16, 3)}
    assert all(np.array_equal(pair.foreground[0], (recipient_mask > 0) | lesion) for pair in pasted)
    assert copy_paste_cases(cases[:1], 3, seed=0) == ([], [])  # no other case to paste into
    textured = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    lesions = torch.zeros(3, 1, 16, 16)
    lesions[:, :, 4:12, 4:12] = 1
    assert memorization_rate((textured[:1], lesions[:1]), (textured, lesions)) == 1.0
    assert memorization_rate((1 - textured[:1], lesions[:1]), (textured[:1], lesions[:1])) == 0.0
    # shape diversity sees outlines, not sizes or places: a square anywhere at any size is one shape
    yy, xx = np.mgrid[:16, :16]
    disc = torch.from_numpy((yy - 8) ** 2 + (xx - 8) ** 2 <= 25).float()[None]
    squares = torch.stack([lesions[0], torch.roll(lesions[0], 3, dims=2), torch.zeros(1, 16, 16)])
    squares[2, 0, 2:6, 9:13] = 1
    assert shape_diversity(squares) == 0.0 and shape_diversity(squares[:1]) is None
    one_disc = shape_diversity(torch.cat([squares, disc[None]]))
    assert 0.0 < one_disc < shape_diversity(torch.cat([squares[:2], disc[None], disc[None]]))
    mixed = torch.cat([squares[:2], disc[None], disc[None]])
    assert shape_diversity_ratio(mixed, squares) is None  # real outlines all alike: no scale to compare with
    assert shape_diversity_ratio(mixed, torch.cat([squares, disc[None]])) == pytest.approx(
        shape_diversity(mixed) / one_disc)
    features = np.random.default_rng(0).normal(size=(400, 4))
    assert abs(kid(features[:200], features[200:])) < 0.01 < 1.0 < kid(features, features + 1.0)


def test_synthetic_metrics_see_the_generated_lesion_not_a_kept_real_one(tmp_path):
    """With --old-lesion keep a pair's label also marks the real lesion it kept: the metrics' mask is
    the generated lesion alone, and the kept one is returned apart (excluded from scoring)."""
    from PIL import Image

    from MedDiffFTLib.phantom import ultrasound_phantom

    image, old = ultrasound_phantom(seed=0, size=48)
    Image.fromarray(image).save(tmp_path / "case.png")
    Image.fromarray(old).save(tmp_path / "case_mask.png")
    new = np.zeros_like(old)
    new[4:12, 4:12] = 255
    assert not (new & old).any()
    Image.fromarray(np.where(new > 0, 20, image).astype(np.uint8)).save(tmp_path / "sample.png")
    Image.fromarray(new | old).save(tmp_path / "sample_label.png")
    entry = {"image": "sample.png", "label": "sample_label.png", "source_image": str(tmp_path / "case.png"),
             "source_label": str(tmp_path / "case_mask.png"), "background_image": str(tmp_path / "case.png")}
    (images, masks), kept, owner = generated_lesions(tmp_path, [{**entry, "old_lesion": "keep"}], 48)
    assert images.shape == (1, 1, 48, 48) and owner.tolist() == [0]
    assert torch.equal(masks[0, 0] > 0, torch.from_numpy(new > 0))
    assert torch.equal(kept[0, 0], torch.from_numpy(old > 0))
    (_, masks), kept, _ = generated_lesions(tmp_path, [{**entry, "old_lesion": "heal"}], 48)  # all of it is new
    assert torch.equal(masks[0, 0] > 0, torch.from_numpy((new | old) > 0)) and not kept.any()


class _BrightJudge(torch.nn.Module):
    """A stand-in segmenter that finds the pixels brighter than mid-grey."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(10.0))

    def forward(self, images):
        return self.scale * (images - 0.5)


def test_late_validation_gain_compares_the_last_two_quarters_of_the_checks():
    rising = {"val_dice": [[step, 0.5 + 0.01 * step] for step in range(8)]}  # quarters (4, 5) vs (6, 7)
    assert late_validation_gain(rising) == pytest.approx(0.02)
    flat_end = {"val_dice": [[step, min(step, 4) / 10] for step in range(12)]}
    assert late_validation_gain(flat_end) == pytest.approx(0.0)
    assert late_validation_gain({"val_dice": [[step, 0.5] for step in range(7)]}) is None


def test_faithful_pairs_are_those_whose_generated_lesion_the_judge_finds():
    """The judge's Dice is on the generated lesion only (a kept real lesion it finds or misses counts
    for nothing), averaged over a pair's lesion slices; pairs below --faithful-min-dice are dropped."""
    images, masks = torch.zeros(4, 1, 8, 8), torch.zeros(4, 1, 8, 8)
    masks[:, :, 2:6, 2:6] = 1
    images[0, :, 2:6, 2:6] = 1  # pair 0, slice 1: found
    images[1, :, 2:6, 2:4] = 1  # pair 0, slice 2: half found (Dice 2/3)
    images[3, :, 2:6, 2:6] = 1  # pair 2: found ...
    kept = torch.zeros(4, 1, 8, 8, dtype=torch.bool)
    kept[3, :, 6:8, 6:8] = True
    images[3, :, 6:8, 6:8] = 1  # ... beside a kept real lesion the judge also finds (not a false positive)
    images[2, :, 0:2, 0:2] = 1  # pair 1: the judge sees a lesion elsewhere only
    dice = judged_dice(_BrightJudge(), (images, masks), kept)
    assert dice == pytest.approx([1.0, 2 / 3, 0.0, 1.0])
    per_pair = pair_dice(dice, np.array([0, 0, 1, 2]), 4)
    assert per_pair[:3] == pytest.approx([5 / 6, 0.0, 1.0]) and np.isnan(per_pair[3])  # pair 3: no lesion slice
    assert faithful_pairs(per_pair, 0.8) == [0, 2]
    assert faithful_pairs(per_pair, 0.9) == [2]
    assert faithful_pairs(per_pair, 0.0) == [0, 1, 2, 3]  # 0: every pair the QA kept


def test_faithful_min_dice_retrains_only_the_synthetic_arm_on_the_pairs_the_judge_finds(split, tmp_path):
    out, seed_dir = tmp_path / "run", tmp_path / "run" / "seed_0"
    evaluate(split, out, "--seeds", "1")
    report = json.loads((out / "report.json").read_text())
    assert report["per_seed_synthetic"][0]["synthetic_pairs_used"] == report["per_seed_synthetic"][0][
        "synthetic_pairs"] == 2
    assert "--faithful-min-dice 0.0): 2/2" in (out / "report.md").read_text()
    trained = {arm: (seed_dir / f"{arm}.json").stat().st_mtime_ns for arm in ("real_only", "real_plus_synthetic")}
    entries = json.loads((seed_dir / "generation" / "manifest.json").read_text())["samples"]
    lesions, kept, owner = generated_lesions(seed_dir / "generation", entries, 32)
    dice = judged_dice(load_segmenter(seed_dir / "real_only.safetensors", torch.device("cpu")), lesions, kept)
    assert owner.tolist() == [0, 1] and dice[0] != dice[1]
    evaluate(split, out, "--seeds", "1", "--faithful-min-dice", f"{dice.mean():.6f}")  # between the two pairs
    report = json.loads((out / "report.json").read_text())
    assert report["per_seed_synthetic"][0]["synthetic_pairs_used"] == 1
    assert (seed_dir / "real_only.json").stat().st_mtime_ns == trained["real_only"]  # the judge is reused
    assert (seed_dir / "real_plus_synthetic.json").stat().st_mtime_ns != trained["real_plus_synthetic"]
    assert json.loads((seed_dir / "real_plus_synthetic.json").read_text())["key"]["faithful_min_dice"] == float(
        f"{dice.mean():.6f}")
    with pytest.raises(MedDiffFTError, match=rf"No synthetic pair of seed 0 reaches --faithful-min-dice 1.0 \(the "
                                             rf"real-only segmenter's best Dice on one is {dice.max():.2f}\); "
                                             r"lower it"):
        evaluate(split, out, "--seeds", "1", "--faithful-min-dice", "1")
    with pytest.raises(MedDiffFTError, match=r"--faithful-min-dice must be in \[0, 1\]; got 1.5"):
        evaluate(split, out, "--seeds", "1", "--faithful-min-dice", "1.5")


class _ConstantJudge(torch.nn.Module):
    """A stand-in segmenter that finds everything (``logit`` > 0) or nothing."""

    def __init__(self, logit: float):
        super().__init__()
        self.logit = torch.nn.Parameter(torch.tensor(logit))

    def forward(self, images):
        return self.logit.expand_as(images)


def test_pseudo_label_is_where_the_segmenters_agree_cut_to_the_largest_lesion_on_the_image_grid(tmp_path):
    from PIL import Image

    image, truth = np.full((40, 60), 40, np.uint8), np.zeros((40, 60), bool)
    truth[10:30, 20:44] = True
    image[truth] = 220
    image[2:4, 2:4] = 220  # a speck: a second, smaller component
    Image.fromarray(image).save(tmp_path / "pool.png")
    case = read_case(str(tmp_path / "pool.png"), require_label=False)
    mask = pseudo_label([_BrightJudge(), _BrightJudge()], case, 32)
    assert mask.shape == (1, 40, 60) and not mask[0, :6, :6].any()  # native grid; the speck is cut
    assert 2 * (mask[0] & truth).sum() / (mask.sum() + truth.sum()) > 0.9
    assert pseudo_label([_BrightJudge(), _ConstantJudge(1.0)], case, 32) is None  # they disagree
    assert pseudo_label([_ConstantJudge(-1.0), _ConstantJudge(-1.0)], case, 32) is None  # agree on nothing
    # union, any agreement: where either finds the lesion (the region --old-lesion cover must hold)
    found = pseudo_label([_BrightJudge(), _ConstantJudge(-1.0)], case, 32, min_agreement=0.0, union=True)
    assert 2 * (found & mask).sum() / (found.sum() + mask.sum()) > 0.95 and not found[0, :6, :6].any()
    assert pseudo_label([_BrightJudge(), _ConstantJudge(1.0)], case, 32, min_agreement=0.0, union=True).all()


def test_pseudo_label_of_a_volume_is_slice_wise_and_keeps_its_largest_3d_lesion_on_the_volume_grid(tmp_path):
    """A volume is judged slice by slice along its slicing axis (the largest spacing) and agreed on as a
    whole; its pseudo-label is written on the pool volume's own grid, which it keeps exactly."""
    import SimpleITK as sitk

    volume, truth = np.full((8, 40, 60), 40, np.int16), np.zeros((8, 40, 60), bool)
    truth[2:6, 10:30, 20:44] = True
    volume[truth] = 220
    volume[7, 2:5, 2:5] = 220  # a speck on another slice: a second, smaller 3D component
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.8, 0.8, 3.0))
    image.SetOrigin((4.0, -2.0, 7.5))
    sitk.WriteImage(image, str(tmp_path / "pool.nrrd"))
    case = read_case(str(tmp_path / "pool.nrrd"), require_label=False)
    mask = pseudo_label([_BrightJudge(), _BrightJudge()], case, 32)
    assert mask.shape == (8, 40, 60) and not mask[7].any() and not mask[:2].any()
    assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) > 0.9
    assert pseudo_label([_BrightJudge(), _ConstantJudge(1.0)], case, 32) is None
    rows, dice = write_pseudo_labels([_BrightJudge(), _BrightJudge()], [(str(tmp_path / "pool.nrrd"), None)],
                                     tmp_path, 32)
    assert dice == [] and rows[0][0] == str(tmp_path / "pool.nrrd")
    written = sitk.ReadImage(rows[0][1])
    assert (written.GetSpacing(), written.GetOrigin(), written.GetDirection()) == (
        image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    assert np.array_equal(sitk.GetArrayFromImage(written) > 0, mask)


def test_pool_backgrounds_paint_into_the_pseudo_labeled_pool_images(split, tmp_path, monkeypatch):
    """--backgrounds pool: the real-only segmenters pseudo-label the pool images (here a stand-in that
    returns each image's own label), the generation paints into those images under their pseudo-labels
    (`run --paint-into`, as many samples as K labeled backgrounds would get), and
    real_plus_pseudo_labels trains on the pseudo-labeled images themselves and
    real_plus_pseudo_labels_and_synthetic on those and the painted pairs, its gain over the former
    reported as the generator's share; a rerun redoes nothing."""
    seen, extra_pairs = [], []

    def own_label(judges, case, resolution):
        seen.append(len(judges))
        return read_case(case.image_path, case.image_path.replace(".png", "_mask.png")).foreground

    def counting(*args, synthetic, **kwargs):
        extra_pairs.append(0 if synthetic is None else len(synthetic[0]))
        return train_segmenter(*args, synthetic=synthetic, **kwargs)

    pasted_into = []

    def pasting(cases, count, seed, quality, recipients):
        pasted_into.append(sorted(case.image_path for case in recipients))
        return copy_paste_cases(cases, count, seed, quality, recipients)

    monkeypatch.setattr("MedDiffFTLib.evaluate.pseudo_label", own_label)
    monkeypatch.setattr("MedDiffFTLib.evaluate.train_segmenter", counting)
    monkeypatch.setattr("MedDiffFTLib.evaluate.copy_paste_cases", pasting)
    out, seed_dir = tmp_path / "run", tmp_path / "run" / "seed_0"
    args = ("--seeds", "1", "--seg-repeats", "2", "--backgrounds", "pool", "--arms",
            "real_only,real_plus_synthetic,real_plus_pseudo_labels,real_plus_pseudo_labels_and_synthetic,"
            "real_plus_copy_paste")
    evaluate(split, out, *args)
    # per arm, both repeats: real only, painted pairs, pseudo-labeled images, both of them, pasted pairs
    assert extra_pairs == [0, 0, 2, 2, 2, 2, 4, 4, 2, 2]
    pool = json.loads((seed_dir / "subset.json").read_text())["unlabeled"]
    assert seen == [2] * len(pool) == [2, 2]  # 5 cases: K=2, 1 validation, 2 in the pool; both segmenters judge
    assert pasted_into == [sorted(str(Path(p).resolve()) for p in pool)]  # the copy-paste arm's recipients too
    pseudo = json.loads((seed_dir / "pseudo_labels.json").read_text())
    assert (pseudo["pseudo_labeled"], pseudo["pool"], pseudo["pseudo_label_dice"]) == (2, 2, 1.0)
    entries = json.loads((seed_dir / "generation" / "manifest.json").read_text())["samples"]
    assert len(entries) == 2  # --synthetic-per-real 1 x K=2, spread over the 2 pool images
    assert sorted(entry["source_image"] for entry in entries) == sorted(str(Path(p).resolve()) for p in pool)
    assert all(Path(entry["source_label"]).parent == seed_dir / "pseudo_labels" for entry in entries)
    report = json.loads((out / "report.json").read_text())
    assert report["delta_dice_real_plus_pseudo_labels_mean"] == pytest.approx(
        report["real_plus_pseudo_labels"]["dice_mean"] - report["real_only"]["dice_mean"])
    assert report["delta_dice_synthetic_beyond_pseudo_labels_mean"] == pytest.approx(
        report["real_plus_pseudo_labels_and_synthetic"]["dice_mean"] - report["real_plus_pseudo_labels"]["dice_mean"])
    real_key = json.loads((seed_dir / "real_only.json").read_text())["key"]
    union_key = json.loads((seed_dir / "real_plus_pseudo_labels_and_synthetic.json").read_text())["key"]
    assert union_key["pseudo_labels"]["real_only"] == union_key["generation"]["pseudo_labels"]["real_only"] == real_key
    for arm in ("real_plus_pseudo_labels", "real_plus_synthetic"):  # a new real-only judge redoes both
        record_key = json.loads((seed_dir / f"{arm}.json").read_text())["key"]
        assert (record_key.get("pseudo_labels") or record_key["generation"]["pseudo_labels"])["real_only"] == real_key
    assert report["per_seed_synthetic"][0]["pseudo_labels"]["pseudo_labeled"] == 2
    text = (out / "report.md").read_text()
    assert "painted into the pool images (--backgrounds)" in text and "Dice >= 0.8): 2/2" in text
    assert "pasted into the pool images (--backgrounds)" in text
    assert "Delta Dice (the generator's share: real + pseudo-labels + synthetic - real + pseudo-labels)" in text
    generated = (seed_dir / "generation" / "manifest.json").stat().st_mtime_ns
    trained = (seed_dir / "real_plus_pseudo_labels.repeat1.json").stat().st_mtime_ns
    evaluate(split, out, *args)
    assert (seed_dir / "generation" / "manifest.json").stat().st_mtime_ns == generated
    assert (seed_dir / "real_plus_pseudo_labels.repeat1.json").stat().st_mtime_ns == trained
    assert seen == [2, 2] and len(extra_pairs) == 10
    with pytest.raises(MedDiffFTError, match=r"--backgrounds pool and the pseudo-label arms pseudo-label the pool "
                                             r"images where the real-only segmenters agree: pass --seg-repeats 2"):
        evaluate(split, out, "--seeds", "1", "--backgrounds", "pool")
    with pytest.raises(MedDiffFTError, match=r"--backgrounds pool and the pseudo-label arms need pool images "
                                             r"beyond the --k 4 labeled and 1 validation cases, but the training "
                                             r"set has 5; lower --k"):
        evaluate(split, tmp_path / "other", "--seg-repeats", "2", "--backgrounds", "pool", "--k", "4")
    with pytest.raises(MedDiffFTError, match=r"Unknown --backgrounds 'normal'; use one of labeled, pool"):
        evaluate(split, out, "--backgrounds", "normal")


def test_pool_backgrounds_take_volumes(tmp_path, monkeypatch):
    """--backgrounds pool with volumes: the pool volumes' pseudo-labels (a stand-in: their own labels)
    are written on their grids, the generation paints into those volumes and keeps each one's geometry
    exactly, and the union arm trains on the pseudo-labeled and the painted volumes' lesion slices."""
    from conftest import geometry, make_volume, read, write_volume

    rows = {}
    for name, seeds in (("train", range(5)), ("test", range(10, 12))):
        lines = ["image,label"]
        for seed in seeds:
            image, label = make_volume(seed)
            paths = [write_volume(array, tmp_path / f"{kind}{seed}.nrrd") for kind, array in (("image", image),
                                                                                             ("label", label))]
            rows[str(paths[0])] = str(paths[1])
            lines.append(",".join(map(str, paths)))
        (tmp_path / f"{name}.csv").write_text("\n".join(lines) + "\n")
    extra_slices = []

    def counting(*args, synthetic, **kwargs):
        extra_slices.append(0 if synthetic is None else len(synthetic[0]))
        return train_segmenter(*args, synthetic=synthetic, **kwargs)

    monkeypatch.setattr("MedDiffFTLib.evaluate.pseudo_label",
                        lambda judges, case, resolution: read_case(case.image_path, rows[case.image_path]).foreground)
    monkeypatch.setattr("MedDiffFTLib.evaluate.train_segmenter", counting)
    out = tmp_path / "run"
    evaluate((tmp_path / "train.csv", tmp_path / "test.csv"), out, "--seeds", "1", "--seg-repeats", "2",
             "--backgrounds", "pool", "--arms", "real_only,real_plus_pseudo_labels_and_synthetic")
    seed_dir = out / "seed_0"
    pseudo = read_cases_csv(str(seed_dir / "pseudo_labels" / "cases.csv"))
    assert len(pseudo) == 2 and json.loads((seed_dir / "pseudo_labels.json").read_text())["pseudo_label_dice"] == 1.0
    for image, label in pseudo:
        assert geometry(read(label))[:4] == geometry(read(image))[:4]
    entries = json.loads((seed_dir / "generation" / "manifest.json").read_text())["samples"]
    assert len(entries) == 2  # --synthetic-per-real 1 x K=2
    assert {entry["source_image"] for entry in entries} <= {str(Path(image).resolve()) for image, _ in pseudo}
    for entry in entries:
        painted = read(seed_dir / "generation" / entry["image"])
        assert geometry(painted) == geometry(read(entry["source_image"]))
    painted = [(str(seed_dir / "generation" / e["image"]), str(seed_dir / "generation" / e["label"])) for e in entries]
    lesion_slices = sum(int(read_case(image, label).foreground.any(axis=(1, 2)).sum())
                        for image, label in pseudo + painted)
    assert lesion_slices > len(pseudo) + len(painted)  # several lesion slices per volume
    assert extra_slices == [0, 0, lesion_slices, lesion_slices]  # real only, then the union arm, 2 repeats each


@pytest.mark.skipif(not (BUSI / "benign" / "images").is_dir(), reason=f"BUSI data not found at {BUSI}")
def test_busi_end_to_end_with_k4_and_one_seed(tmp_path):
    def rows(numbers):
        folder = BUSI / "benign"
        return "image,label\n" + "".join(f"{folder}/images/benign ({i}).png,{folder}/mask/benign ({i})_mask.png\n"
                                         for i in numbers)

    # single-lesion cases only (a case with extra _mask_1 files would need its masks merged)
    (tmp_path / "train.csv").write_text(rows([1, 2, 3, 5, 6, 7]))
    (tmp_path / "test.csv").write_text(rows([8, 9]))
    run_command(["evaluate", "--train", tmp_path / "train.csv", "--test", tmp_path / "test.csv",
                 "--out", tmp_path / "out", "--k", "4", "--seeds", "1", *SEG_TINY, *RUN_TINY, *COMMON])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(report["real_only"]["per_seed"]) == 1 and report["settings"]["test_cases"] == 2
    assert 0.0 <= report["real_plus_synthetic"]["dice_mean"] <= 1.0
    assert report["settings"]["unlabeled_pool_used"] is True  # 6 - 4 labeled - 1 validation = 1 unlabeled
    assert (tmp_path / "out" / "report.md").read_text().startswith("# MedDiffFT evaluation")
