"""The stochastic mask generator: new, placed, reproducible lesions (2D and coherent 3D), the
`masks` command, and its place in `meddiffft run`."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import COMMON, SAMPLE_TINY, SHARED_DATA, TRAIN_TINY, geometry, read, write_volume
from PIL import Image
from scipy import ndimage

from MedDiffFTLib.caseio import read_case
from MedDiffFTLib.cli import run_command
from MedDiffFTLib.backbone import load_model
from MedDiffFTLib.errors import MedDiffFTError, PlacementError
from MedDiffFTLib.generate import SampleSettings, generate_samples, sample_seed
from MedDiffFTLib.mask_generator import (GeneratorMaskSource, GeometryBounds, MaskGenerator,
                                         COVER_MARGIN_PX, MaskTrainSettings, frame_position,
                                         train_mask_generator)
from MedDiffFTLib.masks import Proposal
from MedDiffFTLib.phantom import ultrasound_phantom
from MedDiffFTLib.progress import Progress

TINY_MASKS = MaskTrainSettings(steps=20, resolution=16, batch_size=4)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def train(cases, folder) -> MaskGenerator:
    train_mask_generator(cases, folder / "mask_generator", axis="auto", settings=TINY_MASKS,
                         device=torch.device("cpu"), progress=Progress())
    return MaskGenerator.load(folder, torch.device("cpu"))


def real_area_range(cases) -> tuple[float, float]:
    """The real lesions' largest-slice areas, widened by the default slack."""
    areas = [c.foreground.sum(axis=(1, 2)).max() for c in cases]
    slack = GeometryBounds().area_slack
    return min(areas) / slack, max(areas) * slack


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Three ultrasound-like phantoms (96 px) and a mask generator trained on their lesions."""
    folder = tmp_path_factory.mktemp("pictures")
    cases = []
    for seed in range(3):
        image, mask = ultrasound_phantom(seed=seed, size=96)
        Image.fromarray(image).save(folder / f"us{seed}.png")
        Image.fromarray(mask).save(folder / f"us{seed}_mask.png")
        cases.append(read_case(str(folder / f"us{seed}.png"), str(folder / f"us{seed}_mask.png")))
    region = np.zeros((96, 96), np.uint8)
    region[10:90, 40:92] = 255  # the right part of the image
    Image.fromarray(region).save(folder / "region.png")
    return cases, train(cases, folder / "model"), folder / "region.png"


def test_new_masks_are_novel_placed_sized_and_reproducible(pictures):
    cases, generator, region_path = pictures
    source = GeneratorMaskSource(generator, str(region_path))
    region = np.asarray(Image.open(region_path)) > 0
    low, high = real_area_range(cases)
    case = cases[0]
    masks = []
    for seed in range(6):
        proposal = source.propose(case.label, case.foreground, 0, np.random.default_rng(seed), case)
        new = proposal.foreground[0]
        assert ndimage.label(new)[1] == 1 and np.array_equal(new, ndimage.binary_fill_holes(new))
        assert (new <= region).all()  # inside the allowed region ...
        margin = max(2, round(GeometryBounds().margin * 96))
        assert not new[:margin].any() and not new[-margin:].any()  # ... and away from the border
        assert not new[:, :margin].any() and not new[:, -margin:].any()
        assert low <= new.sum() <= high and proposal.details["area_px"] == new.sum()
        assert all(iou(new, c.foreground[0]) < 0.95 for c in cases)
        assert proposal.details["max_training_iou"] < 0.95
        assert np.array_equal(proposal.label, np.where(new, 255, 0)[None])  # old lesion gone, value kept
        again = source.propose(case.label, case.foreground, 0, np.random.default_rng(seed), case)
        assert np.array_equal(again.label, proposal.label) and again.details == proposal.details
        masks.append(new)
    assert all(not np.array_equal(a, b) for i, a in enumerate(masks) for b in masks[i + 1:])


def ellipsoid_volume(seed: int, shape=(14, 48, 44)) -> tuple[np.ndarray, np.ndarray]:
    """A bright organ in a dark field with a dark ellipsoid lesion spanning 7 slices."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]].astype(float)
    organ = ((yy - 24) / 20) ** 2 + ((xx - 22) / 19) ** 2 < 1
    lesion = ((zz - 6) / 3.6) ** 2 + ((yy - 20 - seed) / 7) ** 2 + ((xx - 18) / (5 + seed)) ** 2 < 1
    image = (50 + 350 * organ - 200 * lesion + 20 * rng.standard_normal(shape)).astype(np.int16)
    return image, lesion.astype(np.uint8)


def assert_coherent(new: np.ndarray) -> np.ndarray:
    """One 3D lesion over consecutive slices (axis 0), one piece per slice; away from its thin
    ends (slices under 10 % of the largest), each slice overlaps the next by IoU >= 0.3 and has at
    most 3x its area (real hippocampi: 0.42-0.85 and 2.2x there). Returns the slices holding it."""
    assert ndimage.label(new)[1] == 1  # no isolated fragments
    held = np.flatnonzero(new.any(axis=(1, 2)))
    assert np.array_equal(held, np.arange(held[0], held[-1] + 1))
    assert all(ndimage.label(new[z])[1] == 1 for z in held)
    areas = new.sum(axis=(1, 2))
    for a, b in zip(held[:-1], held[1:]):
        if min(areas[a], areas[b]) >= 0.1 * areas.max():
            assert iou(new[a], new[b]) >= 0.3
            assert max(areas[a], areas[b]) <= 3 * min(areas[a], areas[b])
    return held


def test_learned_placement_puts_new_lesions_where_the_labeled_lesions_lie(pictures):
    """--placement learned: each new lesion lands near the relative position of the real lesion it
    follows (uniform lands anywhere in the body, on average far further away); a model folder
    without lesion positions names the fix."""
    cases, generator, _ = pictures
    case = cases[0]

    def offsets(placement: str) -> list[float]:
        source = GeneratorMaskSource(generator, placement=placement, bounds=GeometryBounds(spread=0.04))
        found = []
        for seed in range(8):
            proposal = source.propose(case.label, case.foreground, 0, np.random.default_rng(seed), case)
            centre = frame_position(ndimage.center_of_mass(proposal.foreground[0]), (96, 96))
            real = generator.lesions[proposal.details["real_lesion"]]["position"][1:]
            assert proposal.details["placement_mode"] == placement
            assert ("placement_target" in proposal.details) == (placement == "learned")
            found.append(float(np.abs(centre - real).max()))
        return found

    learned, uniform = offsets("learned"), offsets("uniform")
    assert max(learned) < 0.15 and np.mean(uniform) > 2 * np.mean(learned), (learned, uniform)
    assert all(len(lesion["position"]) == 3 and lesion["position"][0] == 0.5 for lesion in generator.lesions)

    old = MaskGenerator(generator.unet, generator.scheduler, generator.shapes,
                        [{k: v for k, v in lesion.items() if k != "position"} for lesion in generator.lesions],
                        generator.device)  # a model folder from before positions were recorded
    with pytest.raises(MedDiffFTError, match=r"This model's mask generator records no lesion positions \(it "
                                             r"predates --placement learned\): fine-tune it again, or use "
                                             r"--placement uniform\."):
        GeneratorMaskSource(old, placement="learned").propose(case.label, case.foreground, 0,
                                                               np.random.default_rng(0), case)


def test_real_lesion_sizes_follow_the_labeled_lesion_each_new_one_is_drawn_from(pictures):
    """--lesion-size real: a new lesion's area lies near its real lesion's (log-normal, sd 0.25);
    range spreads over the whole labeled range."""
    cases, generator, _ = pictures
    case = cases[0]

    def log_ratios(lesion_size: str) -> np.ndarray:
        source = GeneratorMaskSource(generator, lesion_size=lesion_size)
        ratios = []
        for seed in range(12):
            proposal = source.propose(case.label, case.foreground, 0, np.random.default_rng(seed), case)
            assert proposal.details["lesion_size"] == lesion_size
            real = max(generator.lesions[proposal.details["real_lesion"]]["areas"])
            ratios.append(np.log(proposal.details["area_px"] / real))
        return np.abs(ratios)

    real, spread = log_ratios("real"), log_ratios("range")
    assert real.max() < 0.8 and real.mean() < 0.5 * spread.mean(), (real, spread)


def test_a_covering_lesion_holds_the_old_one_where_it_lies(pictures):
    """--old-lesion cover: the new lesion is one piece that holds the old one dilated by
    COVER_MARGIN_PX, centred near it, 1-2 times its area (with the area slack) plus that margin, and
    the label marks it alone; on a background without a lesion it is placed as keep places it."""
    cases, generator, _ = pictures
    source = GeneratorMaskSource(generator, old_lesion="cover")
    slack = GeometryBounds().area_slack
    for case in cases:
        old = case.foreground[0]
        grown = ndimage.binary_dilation(old, iterations=COVER_MARGIN_PX)
        outlines = []
        for seed in range(3):
            proposal = source.propose(case.label, case.foreground, 0, np.random.default_rng(seed), case)
            new = proposal.foreground[0]
            assert new[grown].all() and ndimage.label(new)[1] == 1
            assert grown.sum() <= new.sum() <= 2 * slack * old.sum() + grown.sum()
            assert np.linalg.norm(ndimage.center_of_mass(new) - np.asarray(ndimage.center_of_mass(old))) < 10
            assert np.array_equal(proposal.label[0] != 0, new) and not proposal.healed.any()
            assert proposal.details["old_lesion"] == "cover"
            outlines.append(new)
        assert not np.array_equal(outlines[0], outlines[1])
    blank = replace(cases[0], label=np.zeros_like(cases[0].label), foreground=np.zeros_like(cases[0].foreground))
    keep = GeneratorMaskSource(generator, old_lesion="keep")
    for seed in range(2):
        covered = source.propose(cases[1].label, cases[1].foreground, 0, np.random.default_rng(seed), blank)
        kept = keep.propose(cases[1].label, cases[1].foreground, 0, np.random.default_rng(seed), blank)
        assert covered.foreground.any() and np.array_equal(covered.foreground, kept.foreground)


def test_volume_lesions_are_coherent_in_3d(tmp_path):
    cases = []
    for seed in range(2):
        image, label = ellipsoid_volume(seed)
        cases.append(read_case(str(write_volume(image, tmp_path / f"v{seed}.nrrd", spacing=(1, 1, 3))),
                               str(write_volume(label, tmp_path / f"v{seed}_label.nrrd", spacing=(1, 1, 3)))))
    source = GeneratorMaskSource(train(cases, tmp_path / "model"))
    case = cases[0]
    organ = ((np.mgrid[0:48, 0:44][0] - 24) / 20) ** 2 + ((np.mgrid[0:48, 0:44][1] - 22) / 19) ** 2 < 1
    low, high = real_area_range(cases)
    for seed in range(4):
        proposal = source.propose(case.label, case.foreground, 0, np.random.default_rng(seed), case)
        new = proposal.foreground
        held = assert_coherent(new)
        assert 4 <= len(held) <= 7  # the real lesions span 7 slices; the thin ends may vanish
        assert low <= new.sum(axis=(1, 2)).max() <= high
        assert (new <= organ[None]).all()  # default allowed region: the body (the organ)


def test_allowed_region_segment_and_healed_label(tmp_path):
    """A label with an organ (2) holding the lesion (1): lesions go into the organ segment, and the
    old lesion's place becomes organ again."""
    image, lesion = ellipsoid_volume(0)
    organ = ellipsoid_volume(0)[0] > 200
    label = np.where(lesion > 0, 1, np.where(organ, 2, 0)).astype(np.uint8)
    case = read_case(str(write_volume(image, tmp_path / "v.nrrd", spacing=(1, 1, 3))),
                     str(write_volume(label, tmp_path / "v_label.nrrd", spacing=(1, 1, 3))), segment="1")
    source = GeneratorMaskSource(train([case], tmp_path / "model"), "2")
    organ_only = label == 2
    for seed in range(2):
        proposal = source.propose(case.label, case.foreground, 0, np.random.default_rng(seed), case)
        new = proposal.foreground
        assert (new <= organ_only).all() and (proposal.label[new] == 1).all()
        healed = (label == 1) & ~new
        assert healed.any() and (proposal.label[healed] == 2).all()
        assert np.array_equal(proposal.label[~new & (label != 1)], label[~new & (label != 1)])


def test_run_masks_command_and_erosion(tmp_path, volume_case):
    image_path, label_path = volume_case(".nrrd")
    run_command(["run", "--image", image_path, "--label", label_path, "--out", tmp_path / "run",
                 *TRAIN_TINY, *SAMPLE_TINY, *COMMON])
    model = tmp_path / "run" / "model"
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    card = json.loads((model / "meddiffft.json").read_text())
    assert card["mask_generator"]["steps"] == 2 and (model / "mask_generator" / "unet").is_dir()
    for entry in manifest["samples"]:
        assert entry["mask_source"] == "generator" and entry["erode"]["mode"] == "auto"
        assert isinstance(entry["mask_seed"], int) and entry["max_training_iou"] < 0.95
        assert (sitk.GetArrayFromImage(read(tmp_path / "run" / entry["label"])) > 0).any()
    # the masks command: K masks with the case's exact geometry, equal to the guide masks that
    # `sample` paints with the same seeds and placement options (with --erode 0 its label is the guide mask)
    source = read(label_path)
    for name, placement in (("default", []), ("kept_learned", ["--old-lesion", "keep", "--placement", "learned"])):
        result = run_command(["masks", "--model", model, "--image", image_path, "--label", label_path,
                              "--n", "3", "--out", tmp_path / f"masks_{name}", *placement, *COMMON])
        assert result["masks"] == 3
        masks = json.loads((tmp_path / f"masks_{name}" / "manifest.json").read_text())["masks"]
        assert [m["label"] for m in masks] == ["mask_001.nrrd", "mask_002.nrrd", "mask_003.nrrd"]
        run_command(["sample", "--model", model, "--image", image_path, "--label", label_path, "--out",
                     tmp_path / f"sample_{name}", "--erode", "0", *placement, *SAMPLE_TINY, *COMMON])
        samples = json.loads((tmp_path / f"sample_{name}" / "manifest.json").read_text())["samples"]
        for mask, sample in zip(masks, samples):
            written = read(tmp_path / f"masks_{name}" / mask["label"])
            assert geometry(written)[:4] == geometry(source)[:4]
            guide = sitk.GetArrayFromImage(written)
            assert np.array_equal(guide, sitk.GetArrayFromImage(read(tmp_path / f"sample_{name}" / sample["label"])))
            assert mask["mask_seed"] == sample["mask_seed"] and sample["erode"]["removed_px"] == 0
            assert mask["placement_mode"] == sample["placement_mode"] == (placement[-1] if placement else "uniform")
    # each case draws its own masks (not the same few shapes for every case of a run), and a case's
    # masks depend neither on the other cases nor on their order
    volume = read(image_path)
    other = sitk.GetImageFromArray(sitk.GetArrayFromImage(volume)[::-1].copy())
    other.CopyInformation(volume)
    sitk.WriteImage(other, str(tmp_path / "other.nrrd"))
    (tmp_path / "cases.csv").write_text(
        f"image,label\n{tmp_path / 'other.nrrd'},{label_path}\n{image_path},{label_path}\n")
    run_command(["masks", "--model", model, "--cases", tmp_path / "cases.csv", "--n", "3",
                 "--out", tmp_path / "masks_two", *COMMON])
    two = json.loads((tmp_path / "masks_two" / "manifest.json").read_text())["masks"]
    alone = json.loads((tmp_path / "masks_default" / "manifest.json").read_text())["masks"]
    assert [m["mask_seed"] for m in two[3:]] == [m["mask_seed"] for m in alone]
    assert len({m["mask_seed"] for m in two}) == 6


def test_eroded_label_is_a_non_empty_subset_of_the_guide(pictures):
    from MedDiffFTLib.corrosion import erode_label

    cases, generator, _ = pictures
    source = GeneratorMaskSource(generator)
    case = cases[1]
    for seed in range(3):
        guide = source.propose(case.label, case.foreground, 0, np.random.default_rng(seed), case)
        label, eroded, details = erode_label(guide.label, guide.foreground, 0, "2")
        assert eroded.any() and (eroded <= guide.foreground).all() and eroded.sum() < guide.foreground.sum()
        assert np.array_equal(label > 0, eroded) and details["radius_px"] == [2]


def test_missing_generator_and_misplaced_options_name_the_fix(tmp_path, picture_case):
    image_path, label_path = picture_case
    run_command(["finetune", "--image", image_path, "--label", label_path, "--model-out", tmp_path / "m",
                 *TRAIN_TINY, "--mask-steps", "0", "--qa", "off", *COMMON])
    sample = ["sample", "--model", tmp_path / "m", "--image", image_path, "--label", label_path,
              "--out", tmp_path / "out", *SAMPLE_TINY, *COMMON]
    with pytest.raises(MedDiffFTError, match=r"has no mask generator \(a model from `meddiffft pretrain` "
                                             r"or fine-tuned with --mask-steps 0\): fine-tune it"):
        run_command(sample)
    with pytest.raises(MedDiffFTError, match=r"--allowed-region places generated lesions \(--mask-source "
                                             r"generator\); with --mask-source label drop it\."):
        run_command([*sample, "--mask-source", "label", "--allowed-region", label_path])
    with pytest.raises(MedDiffFTError, match=r"--placement learned places generated lesions \(--mask-source "
                                             r"generator\); --mask-source jitter works from the case's own lesion: "
                                             r"drop --placement\."):
        run_command([*sample, "--jitter", "--placement", "learned"])
    with pytest.raises(MedDiffFTError, match=r"--lesion-size real sizes generated lesions \(--mask-source "
                                             r"generator\); --mask-source label keeps the case's own lesion size: "
                                             r"drop --lesion-size\."):
        run_command([*sample, "--mask-source", "label", "--lesion-size", "real"])
    with pytest.raises(MedDiffFTError, match=r"--old-lesion cover places and sizes the new lesion by the old "
                                             r"one it covers: drop --placement and --lesion-size\."):
        run_command([*sample, "--old-lesion", "cover", "--lesion-size", "real"])
    with pytest.raises(MedDiffFTError, match=r"--old-lesion keep places a generated lesion by the old one "
                                             r"\(--mask-source generator\); --mask-source jitter repaints the "
                                             r"old lesion itself: drop --old-lesion or use --mask-source generator\."):
        run_command(["run", "--image", image_path, "--label", label_path, "--out", tmp_path / "r", *TRAIN_TINY,
                     *SAMPLE_TINY, "--jitter", "--old-lesion", "keep", *COMMON])  # refused before training
    with pytest.raises(MedDiffFTError, match=r"--mask-resolution 30: use a multiple of 4"):
        run_command(["finetune", "--image", image_path, "--label", label_path, "--model-out",
                     tmp_path / "m2", *TRAIN_TINY, "--mask-resolution", "30", *COMMON])
    assert not (tmp_path / "out").exists() and not (tmp_path / "m2" / "meddiffft.json").exists()
    assert not (tmp_path / "r").exists()


def test_the_old_lesion_is_kept_beside_healed_under_or_covered_by_the_new_one(tmp_path, picture_case):
    """--old-lesion keep: the real lesion's pixels are bit-exact, the label marks it and the new
    lesion (placed clear of it); heal (the default) repaints it and drops it from the label; cover
    repaints it inside one new labeled lesion that holds it with a margin."""
    image_path, label_path = picture_case
    run_command(["finetune", "--image", image_path, "--label", label_path, "--model-out", tmp_path / "m",
                 *TRAIN_TINY, "--qa", "off", *COMMON])
    source = np.asarray(Image.open(image_path))
    old = np.asarray(Image.open(label_path)) > 0
    for mode in ("keep", "heal", "cover"):
        out = tmp_path / mode
        run_command(["sample", "--model", tmp_path / "m", "--image", image_path, "--label", label_path,
                     "--erode", "0", "--old-lesion", mode, "--out", out, *SAMPLE_TINY, *COMMON])
        for entry in json.loads((out / "manifest.json").read_text())["samples"]:
            image = np.asarray(Image.open(out / entry["image"]))
            label = np.asarray(Image.open(out / entry["label"])) > 0
            new = label & ~old
            assert entry["old_lesion"] == mode and new.any()
            if mode == "keep":
                assert np.array_equal(image[old], source[old]) and (label[old]).all()
                assert ndimage.distance_transform_edt(~old)[new].min() > 3  # the placement margin
            elif mode == "heal":  # the old lesion's unlabeled rest is repainted
                healed = old & ~label
                assert healed.any() and not np.array_equal(image[healed], source[healed])
            else:
                assert label[ndimage.binary_dilation(old, iterations=COVER_MARGIN_PX)].all()
                assert ndimage.label(label)[1] == 1 and label.sum() == entry["area_px"]  # --erode 0: the guide
                assert not np.array_equal(image[old], source[old])


def test_a_lesion_that_cannot_be_placed_rejects_its_sample_and_no_sample_at_all_is_an_error(tmp_path, picture_case):
    """A sample whose new lesion finds no place is listed as rejected with the reason; when no
    sample is left the run fails with the reasons, and writes nothing."""
    image_path, label_path = picture_case
    run_command(["finetune", "--image", image_path, "--label", label_path, "--model-out", tmp_path / "m",
                 *TRAIN_TINY, "--qa", "off", *COMMON])
    tiny_region = np.zeros((96, 96), np.uint8)
    tiny_region[40:43, 40:43] = 255  # far smaller than any real lesion
    Image.fromarray(tiny_region).save(tmp_path / "tiny.png")
    with pytest.raises(MedDiffFTError, match=r"No sample was kept: all 2 were rejected \(The mask generator "
                                             r"could not place a new lesion"):
        run_command(["sample", "--model", tmp_path / "m", "--image", image_path, "--label", label_path,
                     "--allowed-region", tmp_path / "tiny.png", "--out", tmp_path / "out", *SAMPLE_TINY, *COMMON])
    assert not (tmp_path / "out").exists()

    case = read_case(str(image_path), str(label_path))
    kept, rejected = generate_samples(*load_model(tmp_path / "m", torch.device("cpu")), case,
                                      settings=SampleSettings(samples=2, sampling_steps=2), progress=Progress(),
                                      mask_source=UnplaceableFirst())
    assert [s.seed for s in kept] == [sample_seed(0, case.image, 1)]
    assert rejected == [{"seed": sample_seed(0, case.image, 0), "source_image": str(image_path),
                         "background_image": str(image_path), "reason": "no room for seed 0"}]


class UnplaceableFirst:
    """The case's own label, except that the first sample finds no room."""

    name = "label"

    def __init__(self) -> None:
        self.calls = 0

    def propose(self, label, foreground, axis, rng, background):
        self.calls += 1
        if self.calls == 1:
            raise PlacementError("no room for seed 0")
        return Proposal(label.copy(), foreground.copy(), {}, background.foreground.copy())


HIPPOCAMPUS = SHARED_DATA / "MSD-Task04-Hippocampus"


@pytest.mark.skipif(not HIPPOCAMPUS.is_dir(), reason=f"real data not present at {HIPPOCAMPUS}")
def test_hippocampus_generated_lesions_are_coherent(tmp_path):
    def case(n):
        name = f"hippocampus_{n:03d}.nii.gz"
        return read_case(str(HIPPOCAMPUS / "imagesTr" / name), str(HIPPOCAMPUS / "labelsTr" / name))

    training = [case(1), case(3)]
    target = case(4)
    # the crops hold little besides the hippocampus: allow the whole crop (minus the border margin)
    reference = sitk.ReadImage(target.image_path)
    whole = sitk.GetImageFromArray(np.ones(target.foreground.shape, np.uint8))
    whole.CopyInformation(reference)
    sitk.WriteImage(whole, str(tmp_path / "whole.nii.gz"))
    source = GeneratorMaskSource(train(training, tmp_path), str(tmp_path / "whole.nii.gz"))
    low, high = real_area_range(training)
    for seed in range(2):
        proposal = source.propose(target.label, target.foreground, 0, np.random.default_rng(seed), target)
        new = proposal.foreground
        held = assert_coherent(new)
        assert iou(new, target.foreground) < 0.95
        assert low <= new.sum(axis=(1, 2)).max() <= high
        assert 20 <= len(held) <= 28  # the real hippocampi span 25 and 26 slices


BUSI = SHARED_DATA / "BUSI" / "benign"


@pytest.mark.skipif(not BUSI.is_dir(), reason=f"real data not present at {BUSI}")
def test_busi_masks_land_in_the_body_and_differ_from_the_real_ones(tmp_path):
    def case(n):
        return read_case(str(BUSI / "images" / f"benign ({n}).png"), str(BUSI / "mask" / f"benign ({n})_mask.png"))

    training = [case(n) for n in (1, 2, 3)]
    source = GeneratorMaskSource(train(training, tmp_path))
    target = case(6)
    body = source.region(target)
    low, high = real_area_range(training)
    for seed in range(3):
        new = source.propose(target.label, target.foreground, 0, np.random.default_rng(seed), target).foreground
        assert (new <= body).all() and body.mean() > 0.3
        assert low <= new.sum() <= high and iou(new, target.foreground) < 0.95

