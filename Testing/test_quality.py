"""Quality assessment: calibrated checks reject an unpainted background and a copy of a training
image, keep a real held-out lesion, cross-fit the faithfulness segmenters, and `--qa-keep` keeps
exactly the N best with the rest listed in the manifest."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from conftest import COMMON, SAMPLE_TINY, SHARED_DATA, TRAIN_TINY
from MedDiffFTLib.caseio import read_case
from MedDiffFTLib.cli import run_command
from MedDiffFTLib.errors import MedDiffFTError
from MedDiffFTLib.evaluate import copy_paste_cases
from MedDiffFTLib.finetune import SliceSettings
from MedDiffFTLib.generate import Sample
from MedDiffFTLib.phantom import ultrasound_phantom
from MedDiffFTLib.progress import Progress
from MedDiffFTLib.quality import QualityFilter, QualitySettings, build_reference, prediction_bound

SLICES = asdict(SliceSettings())
# 150 steps: with fewer, the segmenters find lesions on plain tissue too, and the healed check cannot be shown
TINY_QA = QualitySettings(folds=3, segmenter_steps=150, segmenter_resolution=32)
HELD_OUT_SEED = 6  # a phantom none of the training cases (seeds 0..4) is made from


def phantom_case(directory, seed: int):
    image, mask = ultrasound_phantom(seed=seed, size=96)
    Image.fromarray(image).save(directory / f"phantom{seed}.png")
    Image.fromarray(mask).save(directory / f"phantom{seed}_mask.png")
    return read_case(str(directory / f"phantom{seed}.png"), str(directory / f"phantom{seed}_mask.png"))


def make_filter(directory, cases) -> QualityFilter:
    entry = build_reference(cases, SLICES, TINY_QA, model_out=directory, device=torch.device("cpu"),
                            progress=Progress("none"))
    return QualityFilter.load(directory, {"quality": entry, "slices": SLICES}, torch.device("cpu"))


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """Five training phantoms, their quality filter, and a held-out phantom."""
    directory = tmp_path_factory.mktemp("qa")
    train = [phantom_case(directory, seed) for seed in range(5)]
    return train, make_filter(directory / "model", train), phantom_case(directory, HELD_OUT_SEED)


def sample_of(image: np.ndarray, guide: np.ndarray, background) -> Sample:
    """As the engine makes them: the guide and the background's own lesion regenerated."""
    return Sample(image=image, label=guide.astype(np.uint8), foreground=guide, guide=guide,
                  regenerated=guide | background.foreground, background=background, seed=0, slices=[0],
                  seconds=0.0)


def test_keeps_a_real_held_out_lesion(phantoms):
    train, quality, held_out = phantoms
    keep, scores = quality.assess(sample_of(held_out.image, held_out.foreground, train[1]), held_out)
    assert keep and scores["passed"] and scores["reason"] is None
    assert scores["cross_fit"] is True and scores["overall"] > 0
    thresholds = quality.thresholds
    assert scores["realism_distance"] <= thresholds["realism_max_distance"]
    assert scores["contrast"] >= thresholds["paint_min_contrast"]
    assert scores["memorization_ssim"] <= thresholds["memorization_max_ssim"]
    assert scores["faithfulness_dice"] >= thresholds["faithfulness_min_dice"]


def test_faithfulness_scores_a_kept_real_lesion_as_labeled_lesion(phantoms, tmp_path):
    """--old-lesion keep: the background's real lesion stays and is labeled beside the new one;
    the segmenter finding it is agreement, not a false positive (the same pixels unlabeled are)."""
    train, quality, held_out = phantoms
    donor = phantom_case(tmp_path, HELD_OUT_SEED + 1)
    shift = (-60, -36)  # the donor's lesion lands 6 px clear of the held-out lesion
    new = np.roll(donor.foreground, shift, (1, 2))
    assert ndimage.distance_transform_edt(~held_out.foreground)[new].min() > 6
    image = held_out.image.copy()
    image[new] = np.roll(donor.image, shift, (1, 2))[new]
    scores = {}
    for name, label in (("kept", new | held_out.foreground), ("unlabeled", new)):
        sample = Sample(image=image, label=label.astype(np.uint8), foreground=label, guide=new, regenerated=new,
                        background=held_out, seed=0, slices=[0], seconds=0.0)
        scores[name] = quality.assess(sample, held_out)[1]
    floor = quality.thresholds["faithfulness_min_dice"]
    assert scores["kept"]["faithfulness_dice"] >= floor and scores["kept"]["passed"]
    assert scores["unlabeled"]["faithfulness_dice"] < floor
    assert scores["unlabeled"]["reason"].startswith("mask not faithful: segmenter Dice")


def test_rejects_an_unpainted_background(phantoms):
    train, quality, held_out = phantoms
    keep, scores = quality.assess(sample_of(train[1].image.copy(), held_out.foreground, train[1]), held_out)
    assert not keep and scores["changed_fraction"] == 0.0
    assert scores["reason"].startswith("not painted: the image is unchanged inside the guide mask")


def test_rejects_a_copy_of_a_training_image(phantoms):
    train, quality, _ = phantoms
    keep, scores = quality.assess(sample_of(train[0].image, train[0].foreground, train[1]), train[0])
    assert not keep and scores["memorization_ssim"] == 1.0
    assert "memorized: SSIM 1.000 to a training lesion ROI above 0.950" in scores["reason"]


def test_rejects_a_sample_whose_old_lesion_is_still_there(phantoms):
    train, quality, held_out = phantoms
    background, lesion, image = train[3], held_out.foreground[..., ::-1], held_out.image[..., ::-1]
    assert not (background.foreground & lesion).any()  # the new lesion lies elsewhere
    painted = np.where(lesion, image, background.image)  # the old lesion left as it was
    keep, scores = quality.assess(sample_of(painted, lesion, background), held_out)
    healed = quality.thresholds["healed_max_detected"]
    assert not keep and scores["healed_detected"] > healed
    assert f"not healed: the segmenter finds a lesion on {scores['healed_detected']:.0%}" in scores["reason"]


def test_memorization_can_be_reported_without_being_judged(phantoms):
    train, quality, _ = phantoms
    keep, scores = quality.assess(sample_of(train[0].image, train[0].foreground, train[1]), train[0],
                                  check_memorization=False)
    assert scores["memorization_ssim"] == 1.0 and "memorized" not in (scores["reason"] or "")


def test_copy_paste_pairs_go_through_the_same_qa(phantoms):
    train, quality, _ = phantoms
    pasted, scores = copy_paste_cases(train, 6, seed=0, quality=quality)
    assert len(scores) == 6 and len(pasted) == sum(score["passed"] for score in scores) > 0
    assert all(score["cross_fit"] and score["faithfulness_dice"] is not None for score in scores)
    recipients = {case.image_path: case for case in train}
    assert all(pair.foreground.sum() > recipients[pair.image_path].foreground.sum() for pair in pasted)


def test_rejections_are_counted_per_check(phantoms):
    _, quality, _ = phantoms
    rejected = [{"reason": "--jitter could not place the lesion inside the image in 20 tries; lower the "
                           "jitter bounds or use --mask-source label."},
                {"reason": "unrealistic: feature distance 6.81; not painted: contrast -0.81", "qa": {}},
                {"reason": "unrealistic: feature distance 5.02", "qa": {}}]
    assert quality.summary([], rejected, None)["rejections_by_check"] == {"not placed": 1, "unrealistic": 2,
                                                                          "not painted": 1}


def test_thresholds_are_calibrated_on_the_real_lesions(phantoms):
    train, quality, _ = phantoms
    entry = quality.entry
    assert entry["cross_fit"] and entry["fold_of_case"] == [0, 1, 2, 0, 1]
    assert entry["segmenters"] == [f"segmenter_fold{k}.safetensors" for k in range(3)]
    calibration = entry["calibration"]
    assert calibration["realism_real_distances"]["n"] == 5 and calibration["held_out_dice"]["n"] == 5
    assert quality.thresholds["memorization_max_ssim"] == 0.95  # real lesions are far less alike
    assert calibration["real_ssim_to_other_cases"]["max"] < 0.5
    # paint: at most the lower prediction bound of the real lesions' contrast
    assert quality.thresholds["paint_min_contrast"] < calibration["real_contrasts"]["min"]
    assert calibration["tissue_contrasts"]["max"] < calibration["real_contrasts"]["min"]
    # healed: the fold segmenters' lesion share on held-out lesion-free tissue bounds what a healed place may show
    assert calibration["tissue_detected"]["n"] > 5
    assert calibration["tissue_detected"]["median"] < quality.thresholds["healed_max_detected"] < 1.0
    for sample_index, case in enumerate(train):  # each training case is scored by the fold that never saw it
        model, cross_fit = quality._segmenter_for(case)
        assert cross_fit and model is quality.segmenters[entry["fold_of_case"][sample_index]]


@pytest.mark.skipif(not (SHARED_DATA / "BUSI").is_dir(), reason="BUSI not found under ../shared/data")
def test_busi_held_out_lesion_passes_and_a_copy_does_not(tmp_path):
    def busi(number: int):
        folder = SHARED_DATA / "BUSI" / "benign"
        return read_case(str(folder / "images" / f"benign ({number}).png"),
                         str(folder / "mask" / f"benign ({number})_mask.png"))

    def without_lesion(case):  # the background a sample of this lesion would be painted into
        image = case.image.copy()
        image[case.foreground] = np.median(image, axis=(0, 1, 2)).astype(image.dtype)
        return replace(case, image=image)

    train = [busi(number) for number in (3, 5, 9, 11, 13)]
    quality = make_filter(tmp_path, train)
    held_out = busi(52)
    keep, scores = quality.assess(sample_of(held_out.image, held_out.foreground, without_lesion(held_out)),
                                  held_out)
    assert keep, scores["reason"]
    keep, scores = quality.assess(sample_of(train[1].image, train[1].foreground, without_lesion(train[1])),
                                  train[1])
    assert not keep and scores["reason"].startswith("memorized: SSIM 1.000")


def test_prediction_bound_is_a_student_t_bound():
    values = [1.0, 2.0, 3.0]
    assert prediction_bound(values, 95.0, upper=True) == pytest.approx(2.0 + 1.0 * np.sqrt(4 / 3) * 2.919986, rel=1e-6)
    assert prediction_bound([1.0], 95.0, upper=True) is None


def test_one_training_case_cannot_cross_fit(tmp_path):
    case = phantom_case(tmp_path, 0)
    quality = make_filter(tmp_path / "model", [case])
    assert quality.entry["cross_fit"] is False and quality.entry["segmenters"] == ["segmenter_fold0.safetensors"]
    assert quality.thresholds["faithfulness_min_dice"] is None and quality.thresholds["realism_max_distance"] is None
    assert "cross-fitting is impossible" in quality.entry["calibration"]["notes"][0]
    held_out = phantom_case(tmp_path, HELD_OUT_SEED)
    _, scores = quality.assess(sample_of(held_out.image, held_out.foreground, case), held_out)
    assert scores["cross_fit"] is False and "cross-fitting impossible" in scores["cross_fit_note"]


def test_settings_are_checked():
    with pytest.raises(MedDiffFTError, match=r"--qa-folds 1: use at least 2"):
        QualitySettings(folds=1)
    with pytest.raises(MedDiffFTError, match=r"--qa-segmenter-resolution 20: use a multiple of 8"):
        QualitySettings(segmenter_resolution=20)


def test_qa_keep_keeps_exactly_n_and_lists_the_rest(tmp_path):
    """A nearly untrained model started from real lesions (transplant, little noise) paints some
    passable lesions: one per case is kept, the other passing ones are listed as not the best."""
    cases = [phantom_case(tmp_path, seed) for seed in range(3)]
    inputs = [arg for case in cases for arg in ("--image", case.image_path, "--label", case.label_path)]
    out = tmp_path / "out"
    run_command(["run", *inputs, "--out", out, *TRAIN_TINY, *SAMPLE_TINY, "--samples", "5", "--qa", "on",
                 "--qa-keep", "1", "--mask-source", "label", "--init", "transplant", "--strength", "0.05",
                 *COMMON])
    manifest = json.loads((out / "manifest.json").read_text())
    kept, rejected = manifest["samples"], manifest["rejected"]
    assert [entry["source_image"] for entry in kept] == [case.image_path for case in cases]
    assert all(entry["qa"]["passed"] for entry in kept)
    assert len(rejected) == 12 and all(entry["reason"] for entry in rejected)
    for case, entry in zip(cases, kept):  # the kept one outscores every other passing one of its case
        others = [r for r in rejected if r["source_image"] == case.image_path and r["qa"]["passed"]]
        assert all(r["reason"].startswith("not among the best: passed, but the 1 best of 5") and
                   r["qa"]["overall"] <= entry["qa"]["overall"] for r in others)
    qa = manifest["qa"]
    assert (qa["kept"], qa["rejected"], qa["keep_best"]) == (3, 12, 1)
    assert sum(qa["rejections_by_check"].values()) >= 12
    assert set(qa["thresholds"]) == {"realism_max_distance", "paint_min_contrast",
                                     "memorization_max_ssim", "faithfulness_min_dice", "healed_max_detected"}
    assert sorted(p.name for p in out.glob("sample_*_label.png")) == [
        "sample_001_label.png", "sample_002_label.png", "sample_003_label.png"]
    assert (out / "model" / "quality" / "reference.safetensors").is_file()


def test_qa_keep_needs_qa_and_at_most_the_samples(tmp_path):
    case = phantom_case(tmp_path, 0)
    args = ["run", "--image", case.image_path, "--label", case.label_path, "--out", tmp_path / "o",
            *TRAIN_TINY, *SAMPLE_TINY, *COMMON]
    with pytest.raises(MedDiffFTError, match=r"--qa-keep 3: keep 1 to --samples \(2\) samples, with --qa on"):
        run_command([*args, "--qa", "on", "--qa-keep", "3"])
    with pytest.raises(MedDiffFTError, match=r"--qa-keep 1: keep 1 to --samples \(2\) samples, with --qa on"):
        run_command([*args, "--qa-keep", "1"])


def test_sampling_with_qa_needs_a_quality_reference(tmp_path):
    case = phantom_case(tmp_path, 0)
    inputs = ["--image", case.image_path, "--label", case.label_path]
    run_command(["finetune", *inputs, "--model-out", tmp_path / "m", *TRAIN_TINY, "--qa", "off", *COMMON])
    assert not (tmp_path / "m" / "quality").exists()
    with pytest.raises(MedDiffFTError, match=r"has no quality reference \(it was fine-tuned with --qa off"):
        run_command(["sample", "--model", tmp_path / "m", *inputs, "--out", tmp_path / "o", "--samples", "1",
                     *COMMON])
    assert not (tmp_path / "o").exists()
