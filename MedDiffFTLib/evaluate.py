"""``meddiffft evaluate``: does synthetic data improve a segmenter trained on K labeled cases?

Per seed: draw a random K-subset of the training pool (plus validation cases for model selection,
the rest of the pool as unlabeled data), train the fixed segmenter (segmenter.py) on the real
cases, fine-tune and generate through the normal ``run`` command (with ``--backgrounds pool`` into
the pool images the real-only segmenters pseudo-label), then train the segmenter in each other arm
and score every arm on the test cases. Every
finished unit is recorded in the run folder with the inputs it was made from, and skipped on a
restart that gives it the same inputs. The test cases are only read
for scoring.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .caseio import Case, cast_like, output_suffix, read_case, read_cases_csv, write_array
from .errors import MedDiffFTError
from .generate import SAMPLE_SEEDING, Sample
from .masks import dilate
from .outputs import atomic_file, partial_dir, write_json
from .progress import Progress
from .quality import QualityFilter
from .segmenter import (AUGMENTATION_RECIPE, SETTING_NAMES, SegmenterSettings, batch_shares, build_model,
                        check_settings, dice_per_image, encoder_features, hd95_per_image, planes_to_tensor,
                        predict, train_segmenter)
from .slicing import choose_axis, slice_stack, to_channels

# arm name -> (augmentation, the sources of the extra pairs mixed into each batch, pooled)
ARMS = {"real_no_aug": ("none", ()), "real_only": ("strong", ()),
        "real_plus_synthetic": ("strong", ("synthetic",)), "real_plus_copy_paste": ("strong", ("copy_paste",)),
        "real_plus_pseudo_labels": ("strong", ("pseudo_labels",)),
        "real_plus_pseudo_labels_and_synthetic": ("strong", ("pseudo_labels", "synthetic"))}
# (arm, baseline, report name, meaning): the paired Dice deltas reported beside each arm's over
# real_only. The generator's share: what the painted pairs add to the pseudo-labeled pool images.
COMPARISONS = (("real_plus_pseudo_labels_and_synthetic", "real_plus_pseudo_labels", "synthetic_beyond_pseudo_labels",
                "the generator's share: real + pseudo-labels + synthetic - real + pseudo-labels"),)
BACKGROUNDS = ("labeled", "pool")  # what the synthetic and copy-paste arms' new lesions go into (--backgrounds)
# The real-only segmenters' Dice with each other that a pool image needs to get a pseudo-label; set
# before the BUSI run, not tuned (K=20: 26-51 of 100 pool images, their Dice against the withheld
# true labels 0.74-0.84 on average)
PSEUDO_MIN_AGREEMENT = 0.8
MEMORIZATION_NCC = 0.95
# A test case whose whole image correlates above this with a training case counts as seen. BUSI's
# 60-image test split (bench/evaluate_busi.py) holds 7 such cases, each a copy or another frame of a
# training image's lesion (0.97-0.999); the next ones (0.89-0.95) are mostly other scenes, though a
# re-cropped frame can fall that low: a conservative check
NEAR_DUPLICATE_NCC = 0.95
FINGERPRINT_PX, FINGERPRINT_SLICES = 32, 16
SEG_BUDGETS = ("same-steps", "same-passes")  # how the arms' step budgets compare (arm_budgets)
PLATEAU_POINTS = 0.5  # a late validation gain above this many Dice points: the arm may not have plateaued
# Segmenter settings added after evaluation folders existed: a unit's key leaves them out at these
# values (what every older unit trained with), so those units stay valid.
UNKEYED_DEFAULTS = {"synthetic_until": 1.0, "lr_schedule": "constant"}
ROI_PX = 32
SYNTHETIC_METRICS = ("frd", "kid", "faithfulness_ratio", "memorization_rate", "shape_diversity_ratio",
                     "background_preservation")  # per seed, averaged in the report


@dataclass
class EvaluateSettings:
    k: int = 20
    synthetic_per_real: int = 2
    seeds: int = 3
    first_seed: int = 0
    validation_cases: int = 10
    unlabeled_pool: bool = True
    arms: list[str] = field(default_factory=lambda: ["real_only", "real_plus_synthetic"])
    seg_epochs: int = 1000        # passes over the K real cases' slices, at most
    seg_budget: str = "same-steps"  # every arm the steps a mixed arm needs for those passes | "same-passes"
    seg_repeats: int = 1          # segmenters per arm and seed, each with its own seed; Dice averaged
    faithful_min_dice: float = 0.0  # synthetic pairs the real-only segmenter finds at this Dice; 0 = all
    backgrounds: str = "labeled"  # paint (or paste) into the K labeled cases | the pseudo-labeled pool images
    segmenter: SegmenterSettings = field(default_factory=SegmenterSettings)
    run_args: list[str] = field(default_factory=list)  # forwarded to `meddiffft run`
    device: str = "auto"


@dataclass
class Split:
    train: list[tuple[str, str]]
    test: list[tuple[str, str]]


# ---------------------------------------------------------------------------------------------
# Inputs


def _file_key(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_split(train_csv: str, test_csv: str, settings: EvaluateSettings) -> Split:
    """Check both CSVs before any work: files exist, K fits, no test image is also a training image
    (same content, whatever its name)."""
    split = Split(read_cases_csv(train_csv), read_cases_csv(test_csv))
    for name, rows in (("--train", split.train), ("--test", split.test)):
        for number, (image, label) in enumerate(rows, start=2):
            if label is None:
                raise MedDiffFTError(f"{name} CSV row {number}: no label for {image}; every case needs "
                                     "a label in the 'label' column.")
            for path in (image, label):
                if not Path(path).is_file():
                    raise MedDiffFTError(f"{name} CSV row {number}: file {path} not found; fix the path "
                                         "(relative paths are relative to the CSV's folder).")
    needed = settings.k + settings.validation_cases
    if settings.k <= 0 or needed > len(split.train):
        raise MedDiffFTError(f"--k {settings.k} plus {settings.validation_cases} validation cases needs "
                             f"{needed} training cases, but the training set has {len(split.train)}; "
                             "lower --k or --validation-cases, or add cases.")
    train_keys = {_file_key(image): image for image, _ in split.train}
    for image, _ in split.test:
        if _file_key(image) in train_keys:
            raise MedDiffFTError(f"Test case {image} is also a training case ({train_keys[_file_key(image)]}); "
                                 "the test cases must be disjoint from the training set.")
    return split


def draw_subset(count: int, seed: int, settings: EvaluateSettings) -> dict[str, list[int]]:
    """Row indices of the K labeled, the validation and the unlabeled training cases for ``seed``."""
    order = np.random.default_rng(seed).permutation(count).tolist()
    k, v = settings.k, settings.validation_cases
    return {"labeled": order[:k], "validation": order[k:k + v], "unlabeled": order[k + v:]}


Pairs = tuple[torch.Tensor, torch.Tensor]  # (N, 1, R, R) images and masks


def case_tensors(case: Case, resolution: int, *, lesion_slices_only: bool = False) -> Pairs:
    """A case's slices (along the largest-spacing axis; 2D: its one plane) as segmenter tensors."""
    axis = choose_axis(case.spacing, "auto", case.is_2d)
    planes, masks = slice_stack(case.image, axis), slice_stack(case.foreground, axis)
    keep = [i for i in range(len(planes)) if not lesion_slices_only or masks[i].any()]
    return (planes_to_tensor([planes[i] for i in keep], resolution),
            planes_to_tensor([masks[i] for i in keep], resolution, is_mask=True))


def on_grid(case: Case, target: Case) -> tuple[np.ndarray, np.ndarray]:
    """A case's image (linear, within its own intensity range) and foreground (nearest) carried onto
    another case's array grid, channel count and pixel type: "the same place" across cases of other
    sizes."""
    from scipy import ndimage

    image, foreground = to_channels(case.image, target.channels), case.foreground
    if foreground.shape != target.foreground.shape:
        factors = [new / old for new, old in zip(target.foreground.shape, foreground.shape)]
        image = ndimage.zoom(image.astype(np.float32), factors + [1.0] * (image.ndim - foreground.ndim), order=1,
                             mode="nearest", grid_mode=True)
        foreground = ndimage.zoom(foreground.astype(np.uint8), factors, order=0, mode="nearest", grid_mode=True) > 0
    return cast_like(image, case).astype(target.image.dtype, copy=False), foreground


def copy_paste_cases(cases: list[Case], count: int, seed: int, quality: QualityFilter | None = None,
                     recipients: list[Case] | None = None) -> tuple[list[Case], list[dict]]:
    """Context baseline: a real lesion (its labeled pixels, resized with its case to the other's
    grid) pasted at its place into another real case, one of ``recipients`` when given (the
    pseudo-labeled pool images, as --backgrounds pool paints into) or else another of ``cases``; the
    label is the union of both. With ``quality`` (the run's QA) each pair is judged as a synthetic
    one is, except memorization: a pasted lesion is a training lesion by design. Returns the kept
    pairs and every pair's QA scores."""
    donors = [i for i, case in enumerate(cases) if case.foreground.any()]
    if (len(cases) < 2 and not recipients) or not donors:
        return [], []
    rng = np.random.default_rng(seed)
    kept, scores = [], []
    for n in range(count):
        donor = donors[n % len(donors)]
        recipient = (recipients[int(rng.integers(len(recipients)))] if recipients
                     else cases[int(rng.choice([i for i in range(len(cases)) if i != donor]))])
        image, lesion = on_grid(cases[donor], recipient)
        pasted = np.where(lesion[..., None] if image.ndim > lesion.ndim else lesion, image, recipient.image)
        union = recipient.foreground | lesion
        pair = replace(recipient, image=pasted, label=union.astype(np.uint8), foreground=union)
        if quality is not None:
            sample = Sample(image=pasted, label=pair.label, foreground=union, guide=lesion, regenerated=lesion,
                            background=recipient, seed=n, slices=[], seconds=0.0)
            passed, score = quality.assess(sample, cases[donor], check_memorization=False)
            scores.append(score)
            if not passed:
                continue
        kept.append(pair)
    return kept, scores


# ---------------------------------------------------------------------------------------------
# Metrics


def score_cases(model: torch.nn.Module, cases: list[Pairs]) -> dict:
    """Per case: Dice over all its slices together, and slice-wise HD95 (model px) where defined."""
    dice, hd95 = [], []
    for images, masks in cases:
        prediction = predict(model, images)
        dice.append(float(dice_per_image(prediction.reshape(1, 1, -1, prediction.shape[-1]),
                                         masks.bool().reshape(1, 1, -1, masks.shape[-1]))[0]))
        per_slice = hd95_per_image(prediction, masks.bool())
        hd95.append(float(np.nanmean(per_slice)) if np.isfinite(per_slice).any() else None)
    defined = [h for h in hd95 if h is not None]
    return {"dice": dice, "dice_mean": float(np.mean(dice)), "hd95": hd95,
            "hd95_mean": float(np.mean(defined)) if defined else None}


def kid(real: np.ndarray, fake: np.ndarray) -> float | None:
    """Kernel Inception Distance form: unbiased MMD^2 with the cubic polynomial kernel."""
    if len(real) < 2 or len(fake) < 2:
        return None
    dim = real.shape[1]

    def kernel(a, b):
        return (a @ b.T / dim + 1.0) ** 3

    m, n = len(real), len(fake)
    k_rr, k_ff, k_rf = kernel(real, real), kernel(fake, fake), kernel(real, fake)
    return float((k_rr.sum() - np.trace(k_rr)) / (m * (m - 1)) + (k_ff.sum() - np.trace(k_ff)) / (n * (n - 1))
                 - 2 * k_rf.mean())


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float | None:
    """Frechet distance between Gaussians fitted to two feature sets (each feature z-scored over
    both sets together, so no feature's units dominate)."""
    from scipy import linalg

    if len(real) < 2 or len(fake) < 2:
        return None
    both = np.concatenate([real, fake])
    centre, scale = both.mean(0), both.std(0) + 1e-6
    real, fake = (real - centre) / scale, (fake - centre) / scale
    cov_r, cov_f = np.atleast_2d(np.cov(real, rowvar=False)), np.atleast_2d(np.cov(fake, rowvar=False))
    root = linalg.sqrtm(cov_r @ cov_f).real
    return float(((real.mean(0) - fake.mean(0)) ** 2).sum() + np.trace(cov_r + cov_f - 2 * root))


def lesion_radiomics(images: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """Weight-free radiomic-like lesion features (quality.lesion_features) of each slice with a lesion."""
    from .quality import lesion_features

    rows = [lesion_features(image[0].numpy() * 2 - 1, mask[0].numpy() > 0)
            for image, mask in zip(images, masks) if mask.any()]
    return np.asarray(rows).reshape(len(rows), -1)


def lesion_boxes(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Each lesion's bounding box of ``images`` carried to ROI_PX x ROI_PX, flattened."""
    out = []
    for image, mask in zip(images, masks):
        rows, cols = torch.nonzero(mask[0], as_tuple=True)
        if len(rows) == 0:
            continue
        crop = image[:, rows.min():rows.max() + 1, cols.min():cols.max() + 1].float()
        out.append(torch.nn.functional.interpolate(crop[None], size=(ROI_PX, ROI_PX), mode="bilinear",
                                                   align_corners=False).reshape(-1))
    return torch.stack(out) if out else torch.zeros((0, ROI_PX * ROI_PX))


def _unit_rows(rows: torch.Tensor) -> torch.Tensor:
    """Each row zero-mean and unit-norm, so a dot product of two rows is their NCC."""
    rows = rows - rows.mean(dim=1, keepdim=True)
    return rows / (rows.norm(dim=1, keepdim=True) + 1e-6)


def lesion_rois(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Each lesion's box (``lesion_boxes``), zero-mean unit-norm (for NCC)."""
    return _unit_rows(lesion_boxes(images, masks))


def shape_diversity(masks: torch.Tensor) -> float | None:
    """Mean 1 - IoU over all pairs of lesion outlines, each lesion's box carried to ROI_PX (its
    shape, not its size or place): 0 when every lesion has the same outline."""
    shapes = (lesion_boxes(masks, masks) > 0.5).float()
    if len(shapes) < 2:
        return None
    inter = shapes @ shapes.T
    union = shapes.sum(1)[:, None] + shapes.sum(1)[None, :] - inter
    iou = inter / union.clamp(min=1.0)
    pairs = len(shapes) * (len(shapes) - 1)
    return float(1.0 - (iou.sum() - iou.diagonal().sum()) / pairs)


def shape_diversity_ratio(synthetic_masks: torch.Tensor, real_masks: torch.Tensor) -> float | None:
    """``shape_diversity`` of the synthetic lesions over the real ones' (None where undefined)."""
    synthetic, real = shape_diversity(synthetic_masks), shape_diversity(real_masks)
    return synthetic / real if synthetic is not None and real else None


def memorization_rate(synthetic: Pairs, real: Pairs) -> float | None:
    """Share of synthetic lesions whose box correlates (NCC) above MEMORIZATION_NCC with a training
    lesion box: the backgrounds are real by design, so only the painted lesion can be copied."""
    fake, reference = lesion_rois(*synthetic), lesion_rois(*real)
    if len(fake) == 0 or len(reference) == 0:
        return None
    return float(((fake @ reference.T).max(dim=1).values > MEMORIZATION_NCC).float().mean())


def fingerprint(images: torch.Tensor) -> torch.Tensor:
    """A case's slices (N, 1, R, R), as ``case_tensors`` gives them, carried to one grid
    (FINGERPRINT_PX square; a volume's slices also to FINGERPRINT_SLICES), flattened, zero-mean and
    unit-norm: the whole image, so two frames of one scene match whatever their labels say."""
    depth = 1 if len(images) == 1 else FINGERPRINT_SLICES
    grid = F.interpolate(images.float().permute(1, 0, 2, 3)[None], size=(depth, FINGERPRINT_PX, FINGERPRINT_PX),
                         mode="trilinear", align_corners=False)
    return _unit_rows(grid.reshape(1, -1))[0]


def near_duplicates(train: list[torch.Tensor], test: list[torch.Tensor]) -> list[tuple[int, int, float]]:
    """(test index, training index, NCC) for each test case whose closest training case of its kind
    (2D or volume) correlates above NEAR_DUPLICATE_NCC as a whole image: a test case the segmenters
    may have seen in training, under another file name (BUSI holds such frames of one lesion)."""
    references = [fingerprint(images) for images in train]
    found = []
    for index, images in enumerate(test):
        own = fingerprint(images)
        scores = [(float(own @ other), j) for j, other in enumerate(references) if other.shape == own.shape]
        ncc, match = max(scores, default=(-1.0, -1))
        if ncc > NEAR_DUPLICATE_NCC:
            found.append((index, match, ncc))
    return found


def _read_pair(generation_dir: Path, entry: dict) -> tuple[Case, Case]:
    """A written pair and the background it was painted into (labeled when it is the source case
    itself; an unlabeled background image has no lesion of its own)."""
    sample = read_case(str(generation_dir / entry["image"]), str(generation_dir / entry["label"]))
    own_case = entry["background_image"] == entry["source_image"]
    background = read_case(entry["background_image"], entry["source_label"] if own_case else None,
                           require_label=own_case)
    return sample, background


def generated_lesions(generation_dir: Path, entries: list[dict], resolution: int
                      ) -> tuple[Pairs, torch.Tensor, np.ndarray]:
    """The synthetic pairs' slices that hold a generated lesion, with that lesion alone as mask, per
    slice the pixels of a real lesion the pair kept (``--old-lesion keep``; bool, (N, 1, R, R)), and
    per slice the index of its pair in ``entries``: the synthetic-set metrics judge what was
    generated, not the real lesion beside it."""
    images, masks, kept, owner = [], [], [], []
    for index, entry in enumerate(entries):
        sample, background = _read_pair(generation_dir, entry)
        old = background.foreground if entry.get("old_lesion") == "keep" else np.zeros_like(sample.foreground)
        axis = choose_axis(sample.spacing, "auto", sample.is_2d)
        for plane, new, real in zip(slice_stack(sample.image, axis), slice_stack(sample.foreground & ~old, axis),
                                    slice_stack(old, axis)):
            if new.any():
                images.append(plane), masks.append(new), kept.append(real), owner.append(index)
    return ((planes_to_tensor(images, resolution), planes_to_tensor(masks, resolution, is_mask=True)),
            planes_to_tensor(kept, resolution, is_mask=True) > 0, np.asarray(owner, dtype=np.int64))


def judged_dice(judge: torch.nn.Module, lesions: Pairs, kept: torch.Tensor) -> np.ndarray:
    """Per slice, the real-only segmenter's Dice on the generated lesion (a kept real lesion is
    neither right nor wrong): does the painted lesion look like one where its label says?"""
    return dice_per_image(predict(judge, lesions[0]) & ~kept, lesions[1].bool())


def pair_dice(dice: np.ndarray, owner: np.ndarray, count: int) -> np.ndarray:
    """Per pair (of ``count``), the mean of its lesion slices' ``dice``; NaN for a pair without one."""
    return np.array([dice[owner == i].mean() if (owner == i).any() else np.nan for i in range(count)])


def faithful_pairs(per_pair: np.ndarray, min_dice: float) -> list[int]:
    """Indices of the pairs whose generated lesion the judge finds with a Dice (``pair_dice``) of at
    least ``min_dice``; 0 keeps every pair."""
    return [i for i, value in enumerate(per_pair) if min_dice <= 0 or value >= min_dice]


def pseudo_label(judges: list[torch.nn.Module], case: Case, resolution: int, *,
                 min_agreement: float = PSEUDO_MIN_AGREEMENT, union: bool = False) -> np.ndarray | None:
    """A case's lesion where the real-only segmenters (one per --seg-repeats) agree: their mean
    logit, slice by slice along the case's slicing axis (a 2D case: its one plane), upsampled to the
    slice, cut to the largest connected component of the whole case, holes filled in each slice
    (bool, the case's layout); None where their own masks agree over the case at a Dice below
    ``min_agreement`` or find nothing. A pool case so labeled is a background whose own lesion
    can be kept under a label (--backgrounds pool). With ``union`` their largest logit instead:
    where any of them finds the lesion, the region a lesion painted over it (--old-lesion cover)
    must hold."""
    from scipy import ndimage

    axis = choose_axis(case.spacing, "auto", case.is_2d)
    planes = slice_stack(case.image, axis)
    tensor = planes_to_tensor(list(planes), resolution).to(next(judges[0].parameters()).device)
    with torch.no_grad():
        logits = torch.stack([torch.cat([judge(tensor[i:i + 32]).cpu() for i in range(0, len(tensor), 32)])
                              for judge in judges])  # (judges, slices, 1, R, R)
    masks = logits.flatten(1)[:, None, None] > 0  # each judge's whole case as one image for the Dice
    agreement = np.mean([dice_per_image(masks[i], masks[j])[0]
                         for i, j in itertools.combinations(range(len(judges)), 2)])
    native = F.interpolate(logits.amax(0) if union else logits.mean(0), size=planes.shape[1:3], mode="bilinear",
                           align_corners=False)[:, 0].numpy() > 0
    if agreement < min_agreement or not native.any():
        return None
    components, count = ndimage.label(native)
    largest = components == 1 + int(np.argmax(ndimage.sum_labels(native, components, range(1, count + 1))))
    return np.moveaxis(np.stack([ndimage.binary_fill_holes(plane) for plane in largest]), 0, axis)


def background_preservation(generation_dir: Path, entries: list[dict]) -> float | None:
    """Share of pixels farther than the seam from the synthetic lesion (and from the old lesion,
    which a moved mask heals) that equal the background image exactly (1.0 = untouched)."""
    same, total = 0, 0
    for entry in entries:
        sample, background = _read_pair(generation_dir, entry)
        if background.image.shape != sample.image.shape:
            continue
        axis = choose_axis(sample.spacing, "auto", sample.is_2d)
        changed = sample.foreground | background.foreground
        for plane, fg, before in zip(slice_stack(sample.image, axis), slice_stack(changed, axis),
                                     slice_stack(background.image, axis)):
            outside = ~dilate(fg, float(entry.get("seam_px") or 0) + 1.5)
            equal = np.all(plane == before, axis=-1) if plane.ndim == 3 else plane == before
            same += int(equal[outside].sum())
            total += int(outside.sum())
    return same / total if total else None


# ---------------------------------------------------------------------------------------------
# The run folder


class _Bar:
    """One progress bar over the whole run; inner stages move it through event callbacks."""

    def __init__(self, advance: Callable[[int], None]):
        self.advance = advance
        self.position = 0

    def unit(self, weight: int) -> tuple[Progress, Callable[[], None]]:
        """A Progress for one unit of ``weight`` bar steps, and the call that completes the unit."""
        start, seen = self.position, {}

        def move_to(target: int) -> None:
            if target > self.position:
                self.advance(target - self.position)
                self.position = target

        def on_event(event: dict) -> None:
            if "stage" in event and "step" in event:
                seen[event["stage"]] = event["step"]
                move_to(start + min(weight - 1, sum(seen.values())))

        return Progress("none", on_event), lambda: move_to(start + weight)


def _start_unit() -> float:
    """Reset the GPU peak-memory counter; return the start time."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return time.monotonic()


def _peak_memory_mb() -> dict:
    """The process's peak RSS so far (CPU) and the unit's peak GPU allocation, in MB."""
    peak = {"rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        peak["gpu"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


def _write_csv(path: Path, rows: list[tuple[str, str | None]], *, labels: bool = True) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label"] if labels else ["image"])
        for image, label in rows:
            writer.writerow([os.path.abspath(image), os.path.abspath(label)] if labels else [os.path.abspath(image)])


def _run_argv(seed_dir: Path, seed: int, settings: EvaluateSettings, unlabeled: bool,
              paint_into: Path | None = None, targets: int = 0) -> list[str]:
    """The generation's `meddiffft run` call. With ``paint_into`` (``targets`` pseudo-labeled pool
    images) the samples and --qa-keep per image are scaled so that the candidates and the kept pairs
    number about what K labeled backgrounds would give (rounded up)."""
    argv = ["run", "--cases", str(seed_dir / "labeled.csv"), "--out", str(seed_dir / "generation"),
            "--samples", str(settings.synthetic_per_real), "--seed", str(seed), "--device", settings.device,
            "--progress", "none", "--resume"]
    if unlabeled:
        argv += ["--unlabeled-cases", str(seed_dir / "unlabeled.csv")]
    argv += list(settings.run_args)
    if paint_into is not None:
        from .cli import build_parser

        chosen = build_parser().parse_args(argv)
        argv += ["--paint-into", str(paint_into), "--samples", str(math.ceil(chosen.samples * settings.k / targets))]
        if chosen.qa_keep:
            argv += ["--qa-keep", str(math.ceil(chosen.qa_keep * settings.k / targets))]
    return argv


def _generation_weight(argv: list[str], k: int) -> int:
    """Bar steps of one fine-tune + generation (its optimizer steps and samples); checks the run
    options before any work."""
    from .cli import build_parser

    args = build_parser().parse_args(argv)
    pretrain = args.pretrain_steps if args.pretrain_steps is not None else (
        args.train_steps if args.unlabeled_cases else 0)
    return args.train_steps + pretrain + args.samples * k


def _stack(pairs: list[Pairs], resolution: int) -> Pairs:
    if not pairs:
        return torch.zeros((0, 1, resolution, resolution)), torch.zeros((0, 1, resolution, resolution))
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def _run_quality(model_dir: Path, device: torch.device) -> QualityFilter | None:
    """The generation's QA (None when it ran with --qa off)."""
    from .backbone import read_model_card

    card = read_model_card(model_dir)
    return QualityFilter.load(model_dir, card, device) if "quality" in card else None


def load_segmenter(path: Path, device: torch.device) -> torch.nn.Module:
    """An arm's saved segmenter (safetensors), in eval mode on ``device``."""
    from safetensors.torch import load_file

    model = build_model()
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()


def _save_segmenter(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))


def _open_run_folder(out: Path, record: dict, overwrite: bool) -> None:
    """Start a run folder, or continue one (units whose inputs did not change are kept)."""
    import shutil

    settings_path = out / "settings.json"
    if out.exists() and not out.is_dir():
        raise MedDiffFTError(f"--out {out} is a file; choose a folder path.")
    if out.is_dir() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not settings_path.is_file():
            raise MedDiffFTError(f"--out {out} is not empty and holds no evaluation; choose another "
                                 "folder or pass --overwrite to replace it.")
    out.mkdir(parents=True, exist_ok=True)
    write_json(settings_path, record)


def _unit_done(path: Path, key: dict) -> bool:
    """A unit's record exists and was made from the same inputs (``key``)."""
    return path.is_file() and json.loads(path.read_text()).get("key") == json.loads(json.dumps(key, default=str))


def _generate(seed_dir: Path, seed: int, key: dict, rows: dict, settings: EvaluateSettings, unlabeled_on: bool,
              bar: _Bar, weight: int, paint_into: Path | None = None, targets: int = 0) -> list[dict]:
    """Fine-tune and generate through `meddiffft run --resume` (skipped when done with the same
    inputs; an interrupted one continues its fine-tune from the last checkpoint); returns the
    manifest's sample entries."""
    import shutil

    from .cli import run_command

    record_path, generation_dir = seed_dir / "generation.json", seed_dir / "generation"
    started = seed_dir / "generation.started.json"
    child, finish = bar.unit(weight)
    if not _unit_done(record_path, key):
        shutil.rmtree(generation_dir, ignore_errors=True)
        if not _unit_done(started, key):  # an interrupted generation of other inputs is not continued
            shutil.rmtree(partial_dir(generation_dir), ignore_errors=True)
            write_json(started, {"key": key})
        _write_csv(seed_dir / "labeled.csv", rows["labeled"])
        _write_csv(seed_dir / "unlabeled.csv", rows["unlabeled"], labels=False)
        began = _start_unit()
        run_command(_run_argv(seed_dir, seed, settings, unlabeled_on, paint_into, targets), on_progress=child.emit)
        write_json(record_path, {"key": key, "seconds": round(time.monotonic() - began, 2),
                                 "peak_memory_mb": _peak_memory_mb()})
    finish()
    return json.loads((generation_dir / "manifest.json").read_text())["samples"]


def write_pseudo_labels(judges: list[torch.nn.Module], pool: list[tuple[str, str | None]], folder: Path,
                        resolution: int, **options) -> tuple[list[tuple[str, str]], list[float]]:
    """Pseudo-label each pool case (``pseudo_label`` with ``options``) and write the labels into
    ``folder`` like its image, with folder/cases.csv listing them; returns the (image, pseudo-label)
    rows and, where the case has its own label, each pseudo-label's Dice against it (a diagnosis:
    nothing trains on those labels)."""
    rows, dice = [], []
    for index, (image, label) in enumerate(pool):
        case = read_case(image, label, require_label=False)
        mask = pseudo_label(judges, case, resolution, **options)
        if mask is None:
            continue
        path = folder / f"pool_{index:03d}{output_suffix(case, is_label=True)}"
        write_array(case, mask.astype(np.uint8), path, is_label=True)
        rows.append((image, str(path)))
        if label is not None:
            dice.append(float(dice_per_image(torch.from_numpy(mask[None]), torch.from_numpy(case.foreground[None]))[0]))
    _write_csv(folder / "cases.csv", rows)
    return rows, dice


def _pseudo_label_pool(seed_dir: Path, seed: int, pool: list[tuple[str, str]], key: dict, settings: EvaluateSettings,
                       device: torch.device, bar: _Bar) -> tuple[Path, list[tuple[str, str]], dict]:
    """Pseudo-label the seed's pool images with its real-only segmenters (skipped when done with the
    same inputs), labels written to seed_dir/pseudo_labels/; returns their cases CSV, its (image,
    pseudo-label) rows and the record: counts, and the pseudo-labels' Dice against the pool's own
    labels, a diagnosis that nothing trains on."""
    import shutil

    record_path, folder = seed_dir / "pseudo_labels.json", seed_dir / "pseudo_labels"
    _, finish = bar.unit(len(pool))
    if not _unit_done(record_path, key):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        judges = [load_segmenter(seed_dir / f"{unit_name('real_only', repeat)}.safetensors", device)
                  for repeat in range(settings.seg_repeats)]
        rows, dice = write_pseudo_labels(judges, pool, folder, settings.segmenter.resolution)
        if not rows:
            raise MedDiffFTError(f"The real-only segmenters of seed {seed} agree (Dice >= {PSEUDO_MIN_AGREEMENT}) "
                                 f"on no lesion in the {len(pool)} pool images; raise --seg-epochs, or use "
                                 "--backgrounds labeled without the pseudo-label arms.")
        write_json(record_path, {"key": key, "pseudo_labeled": len(rows), "pool": len(pool),
                                 "pseudo_label_dice": float(np.mean(dice))})
    finish()
    record = json.loads(record_path.read_text())
    return folder / "cases.csv", read_cases_csv(str(folder / "cases.csv")), {k: v for k, v in record.items()
                                                                             if k != "key"}


def arm_budgets(passes_steps: int, settings: EvaluateSettings) -> dict[str, int]:
    """Each arm's step budget. ``passes_steps`` makes --seg-epochs passes over the real cases with
    real-only batches; a mixed arm draws only (1 - synthetic fraction) of each batch from the real
    cases while it mixes (``synthetic_until`` of its steps), so it needs proportionally more steps
    for the same passes (the extra pairs add to the real ones, never replace them). same-steps gives
    every arm, whichever arms run, the mixed arm's steps, so a mixed arm's gain is not merely longer
    training (on BUSI, doubling a real-only segmenter's steps raised its test Dice by 1.3 points);
    same-passes keeps each arm's own."""
    segmenter = settings.segmenter
    real_per_step = (segmenter.synthetic_until * batch_shares(segmenter)[0]
                     + (1 - segmenter.synthetic_until) * segmenter.batch_size)
    mixed = math.ceil(passes_steps * segmenter.batch_size / real_per_step)
    return {arm: mixed if ARMS[arm][1] or settings.seg_budget == "same-steps" else passes_steps
            for arm in settings.arms}


def unit_name(arm: str, repeat: int) -> str:
    """An arm's record name; repeat 0 keeps the plain arm name, so folders made before
    --seg-repeats stay valid."""
    return arm if repeat == 0 else f"{arm}.repeat{repeat}"


def segmenter_seed(seed: int, repeat: int) -> int:
    """The segmenter seed of a repeat: the subset's seed for repeat 0 (as before --seg-repeats),
    then seeds that collide with no other subset's."""
    return seed if repeat == 0 else int(np.random.SeedSequence([seed, repeat]).generate_state(1)[0])


def late_validation_gain(history: dict) -> float | None:
    """Mean validation Dice over the last quarter of a segmenter's checks minus over the quarter
    before: about 0 once the budget has let it plateau (issue 6 asks each arm to converge); None
    with fewer than 8 checks."""
    dice = np.asarray([value for _, value in history["val_dice"]], dtype=np.float64)
    quarter = len(dice) // 4
    return float(dice[-quarter:].mean() - dice[-2 * quarter:-quarter].mean()) if quarter >= 2 else None


def combine_repeats(records: list[dict]) -> dict:
    """An arm's result over its repeats: test Dice, HD95, best validation Dice and the late
    validation gain averaged; the first repeat's training history (curves, best step) stands for
    the arm."""
    return {"dice_mean": float(np.mean([r["dice_mean"] for r in records])),
            "dice": np.mean([r["dice"] for r in records], axis=0).tolist(),  # per test case
            "hd95_mean": _mean_defined(r["hd95_mean"] for r in records),
            "best_val_dice": float(np.mean([max(v for _, v in r["history"]["val_dice"]) for r in records])),
            "late_val_gain": _mean_defined(late_validation_gain(r["history"]) for r in records),
            "repeats": [r["dice_mean"] for r in records], "history": records[0]["history"],
            "seconds": round(sum(r["seconds"] for r in records), 2),
            "peak_memory_mb": records[-1]["peak_memory_mb"]}


def arm_dice(result: dict, keep: np.ndarray | None = None) -> float:
    """An arm's test Dice (a ``combine_repeats`` result) over the test cases in ``keep``, all when None."""
    return result["dice_mean"] if keep is None else float(np.mean(np.asarray(result["dice"])[keep]))


def _train_arm(seed_dir: Path, arm: str, seed: int, key: dict, steps: int, real, validation, extra, test,
               settings: EvaluateSettings, device: torch.device, bar: _Bar) -> dict:
    """Train and score one arm's segmenters, one per repeat (each skipped when done with the same
    inputs)."""
    augmentation, sources = ARMS[arm]
    pairs = _stack([extra[source] for source in sources], settings.segmenter.resolution) if sources else None
    records = []
    for repeat in range(settings.seg_repeats):
        record_path = seed_dir / f"{unit_name(arm, repeat)}.json"
        unit_key = {**key, "repeat": repeat} if repeat else key
        child, finish = bar.unit(steps)
        if not _unit_done(record_path, unit_key):
            seg = SegmenterSettings(**{**asdict(settings.segmenter), "augmentation": augmentation,
                                       "seed": segmenter_seed(seed, repeat), "max_steps": steps,
                                       "validate_every": max(1, steps // 40)})
            began = _start_unit()
            model, history = train_segmenter(real[0], real[1], seg, device=device, validation=validation,
                                             synthetic=pairs, progress=child)
            _save_segmenter(model, seed_dir / f"{unit_name(arm, repeat)}.safetensors")
            write_json(record_path, {"key": unit_key, **score_cases(model, test), "history": history,
                                     "seconds": round(time.monotonic() - began, 2),
                                     "peak_memory_mb": _peak_memory_mb()})
        finish()
        records.append(json.loads(record_path.read_text()))
    return combine_repeats(records)


def evaluate(train_csv: str, test_csv: str, out: Path, settings: EvaluateSettings, *,
             progress: Progress, overwrite: bool = False) -> dict:
    """Run (or continue) the evaluation in ``out``; returns the report."""
    from .backbone import resolve_device

    for arm in settings.arms:
        if arm not in ARMS:
            raise MedDiffFTError(f"Unknown arm {arm!r}; use some of {', '.join(ARMS)}.")
    if "real_only" not in settings.arms:
        raise MedDiffFTError("--arms must include real_only (the baseline and the faithfulness judge).")
    if min(settings.seeds, settings.synthetic_per_real, settings.seg_epochs, settings.seg_repeats) <= 0:
        raise MedDiffFTError("--seeds, --synthetic-per-real, --seg-epochs and --seg-repeats must be positive.")
    if settings.seg_budget not in SEG_BUDGETS:
        raise MedDiffFTError(f"Unknown --seg-budget {settings.seg_budget!r}; use one of {', '.join(SEG_BUDGETS)}.")
    check_settings(settings.segmenter, {**SETTING_NAMES, "synthetic_fraction": "--synthetic-fraction",
                                        "synthetic_until": "--synthetic-until", "lr_schedule": "--seg-lr-schedule"})
    if not 0.0 <= settings.faithful_min_dice <= 1.0:
        raise MedDiffFTError(f"--faithful-min-dice must be in [0, 1]; got {settings.faithful_min_dice}.")
    if settings.backgrounds not in BACKGROUNDS:
        raise MedDiffFTError(f"Unknown --backgrounds {settings.backgrounds!r}; use one of {', '.join(BACKGROUNDS)}.")
    extra_sources = {source for arm in settings.arms for source in ARMS[arm][1]}
    needs_generation = "synthetic" in extra_sources
    into_pool = settings.backgrounds == "pool" and bool({"synthetic", "copy_paste"} & extra_sources)
    needs_pseudo = into_pool or "pseudo_labels" in extra_sources
    if needs_pseudo and settings.seg_repeats < 2:
        raise MedDiffFTError("--backgrounds pool and the pseudo-label arms pseudo-label the pool images where the "
                             "real-only segmenters agree: pass --seg-repeats 2 or more.")
    batch_shares(settings.segmenter)
    split = read_split(train_csv, test_csv, settings)
    if needs_pseudo and len(split.train) <= settings.k + settings.validation_cases:
        raise MedDiffFTError(f"--backgrounds pool and the pseudo-label arms need pool images beyond the --k "
                             f"{settings.k} labeled and {settings.validation_cases} validation cases, but the "
                             f"training set has {len(split.train)}; lower --k or --validation-cases, or add cases.")
    device = resolve_device(settings.device)
    record = {"train": os.path.abspath(train_csv), "test": os.path.abspath(test_csv), **asdict(settings)}
    seeds = list(range(settings.first_seed, settings.first_seed + settings.seeds))
    unlabeled_on = settings.unlabeled_pool and len(split.train) > settings.k + settings.validation_cases
    generation_weight = (_generation_weight(_run_argv(out / "seed", 0, settings, unlabeled_on), settings.k)
                         if needs_generation else 0)
    _open_run_folder(out, record, overwrite)
    resolution = settings.segmenter.resolution
    loaded = {image: case_tensors(read_case(image, label), resolution) for image, label in split.train}

    def stacked(rows) -> Pairs:
        return _stack([loaded[image] for image, _ in rows], resolution)

    test = [case_tensors(read_case(image, label), resolution) for image, label in split.test]
    duplicates = [{"test": split.test[index][0], "train": split.train[match][0], "ncc": round(ncc, 4)}
                  for index, match, ncc in near_duplicates([loaded[image][0] for image, _ in split.train],
                                                           [images for images, _ in test])]
    started = time.monotonic()
    plans = []
    for seed in seeds:
        subset = draw_subset(len(split.train), seed, settings)
        rows = {name: [split.train[i] for i in indices] for name, indices in subset.items()}
        real = stacked(rows["labeled"])
        steps = max(1, math.ceil(settings.seg_epochs * len(real[0]) / settings.segmenter.batch_size))
        plans.append((seed, rows, real, steps))
    total = sum(generation_weight + settings.seg_repeats * sum(arm_budgets(steps, settings).values())
                + (len(rows["unlabeled"]) if needs_pseudo else 0) for _, rows, _, steps in plans)
    generation_inputs = {**{name: record[name] for name in ("train", "test", "k", "validation_cases", "unlabeled_pool",
                                                            "synthetic_per_real", "run_args")},
                         "sample_seeding": SAMPLE_SEEDING}
    per_seed, grid = {}, ()
    with progress.stage("evaluate", total) as advance:
        bar = _Bar(advance)
        for seed, rows, real, steps in plans:
            seed_dir = out / f"seed_{seed}"
            seed_dir.mkdir(exist_ok=True)
            write_json(seed_dir / "subset.json", {name: [image for image, _ in r] for name, r in rows.items()})
            validation = stacked(rows["validation"])
            extra: dict[str, Pairs] = {}
            timings: dict[str, dict] = {}
            qa_summary: dict[str, dict | None] = {}
            arms, metrics, keys = {}, {}, {}
            generation_key = {**generation_inputs, "seed": seed}

            def train(arm: str) -> None:
                sources = ARMS[arm][1]
                budget = arm_budgets(steps, settings)[arm]
                segmenter = {name: value for name, value in asdict(settings.segmenter).items()
                             if name not in UNKEYED_DEFAULTS or value != UNKEYED_DEFAULTS[name]}
                if not sources:  # unused without extra pairs: another fraction keeps this arm's result
                    segmenter.pop("synthetic_fraction")
                    segmenter.pop("synthetic_until", None)
                keys[arm] = {"arm": arm, "seed": seed, "seg_epochs": settings.seg_epochs, "max_steps": budget,
                             "segmenter": segmenter, "validation_cases": settings.validation_cases,
                             **({"augmentation_recipe": AUGMENTATION_RECIPE} if ARMS[arm][0] == "strong" else {}),
                             "train": record["train"], "test": record["test"], "k": settings.k,
                             **({"generation": generation_key} if "synthetic" in sources else {}),
                             **({"faithful_min_dice": settings.faithful_min_dice}
                                if "synthetic" in sources and settings.faithful_min_dice > 0 else {}),
                             **({"qa_from_generation": generation_key if qa_summary["copy_paste_qa"] else None}
                                if "copy_paste" in sources else {}),
                             **({"synthetic_per_real": settings.synthetic_per_real}
                                if {"synthetic", "copy_paste"} & set(sources) else {}),
                             **({"pseudo_labels": pseudo_key} if "pseudo_labels" in sources else {}),
                             **({"backgrounds": "pool", "pseudo_labels": pseudo_key}
                                if "copy_paste" in sources and into_pool else {})}
                arms[arm] = _train_arm(seed_dir, arm, seed, keys[arm], budget, real, validation, extra, test,
                                       settings, device, bar)
                timings[arm] = {name: arms[arm][name] for name in ("seconds", "peak_memory_mb")}

            train("real_only")  # the faithfulness judge, and with several repeats the pseudo-labeler
            if needs_pseudo:
                pseudo_key = {"real_only": keys["real_only"], "seg_repeats": settings.seg_repeats,
                              "min_agreement": PSEUDO_MIN_AGREEMENT}
                pseudo_csv, pool_rows, metrics["pseudo_labels"] = _pseudo_label_pool(
                    seed_dir, seed, rows["unlabeled"], pseudo_key, settings, device, bar)
                if "pseudo_labels" in extra_sources:
                    extra["pseudo_labels"] = _stack([case_tensors(read_case(image, label), resolution,
                                                                  lesion_slices_only=True)
                                                     for image, label in pool_rows], resolution)
            if needs_generation:
                generation_dir = seed_dir / "generation"
                paint_into = None
                if settings.backgrounds == "pool":
                    generation_key.update(backgrounds="pool", pseudo_labels=pseudo_key)
                    paint_into = pseudo_csv
                entries = _generate(seed_dir, seed, generation_key, rows, settings, unlabeled_on, bar,
                                    generation_weight, paint_into, len(pool_rows) if paint_into else 0)
                recorded = json.loads((seed_dir / "generation.json").read_text())
                timings["generation"] = {k: v for k, v in recorded.items() if k != "key"}
                timings["generation"]["seconds_per_kept_sample"] = (
                    round(timings["generation"]["seconds"] / len(entries), 2) if entries else None)
                if not entries:
                    raise MedDiffFTError(f"The generation for seed {seed} kept no samples "
                                         f"({generation_dir / 'manifest.json'}); loosen the QA options "
                                         "in --run-args.")
                lesions, kept, owner = generated_lesions(generation_dir, entries, resolution)
                judge = load_segmenter(seed_dir / "real_only.safetensors", device)
                dice = judged_dice(judge, lesions, kept)
                used = faithful_pairs(pair_dice(dice, owner, len(entries)), settings.faithful_min_dice)
                if not used:
                    raise MedDiffFTError(f"No synthetic pair of seed {seed} reaches --faithful-min-dice "
                                         f"{settings.faithful_min_dice} (the real-only segmenter's best Dice "
                                         f"on one is {dice.max(initial=0.0):.2f}); lower it.")
                extra["synthetic"] = _stack([case_tensors(read_case(str(generation_dir / entries[i]["image"]),
                                                                    str(generation_dir / entries[i]["label"])),
                                                          resolution, lesion_slices_only=True) for i in used],
                                            resolution)
                metrics.update(_synthetic_metrics(generation_dir, entries, lesions, dice, real, judge, arms),
                               synthetic_pairs_used=len(used))
            if "real_plus_copy_paste" in settings.arms:
                quality = _run_quality(seed_dir / "generation" / "model", device) if needs_generation else None
                into = [read_case(image, label) for image, label in pool_rows] if into_pool else None
                pasted, qa_scores = copy_paste_cases([read_case(image, label) for image, label in rows["labeled"]],
                                                     settings.synthetic_per_real * settings.k, seed, quality, into)
                extra["copy_paste"] = _stack([case_tensors(case, resolution, lesion_slices_only=True)
                                              for case in pasted], resolution)
                qa_summary["copy_paste_qa"] = ({"kept": len(pasted), "candidates": len(qa_scores)}
                                               if quality is not None else None)
            for arm in settings.arms:
                if arm != "real_only":
                    train(arm)
            grid = grid or (real, extra.get("synthetic"))
            per_seed[seed] = {"arms": {arm: arms[arm] for arm in settings.arms}, "timings": timings, **qa_summary,
                              **metrics}
    report = build_report(per_seed, settings, record, split, unlabeled_on, time.monotonic() - started, duplicates)
    write_report(out, report, per_seed, *grid)
    return report


def _synthetic_metrics(generation_dir: Path, entries: list[dict], lesions: Pairs, dice: np.ndarray, real,
                       judge: torch.nn.Module, arms: dict) -> dict:
    """Faithfulness, realism (FRD, KID), memorization and background preservation of all of a
    seed's generated lesions (``dice``: the judge's, per slice)."""
    test_dice = arms["real_only"]["repeats"][0]  # the judge's own test Dice (repeat 0), not the repeats' mean
    real_lesions = (real[0][real[1].flatten(1).any(1)], real[1][real[1].flatten(1).any(1)])
    return {"synthetic_pairs": len(entries),
            "faithfulness_dice": float(dice.mean()),
            "faithfulness_ratio": float(dice.mean()) / test_dice if test_dice > 0 else None,
            "frd": frechet_distance(lesion_radiomics(*real_lesions), lesion_radiomics(*lesions)),
            "kid": kid(encoder_features(judge, *real_lesions), encoder_features(judge, *lesions)),
            "memorization_rate": memorization_rate(lesions, real_lesions),
            "shape_diversity_ratio": shape_diversity_ratio(lesions[1], real_lesions[1]),
            "background_preservation": background_preservation(generation_dir, entries)}


def _summary(values: list[float]) -> dict:
    array = np.asarray(values, dtype=np.float64)
    return {"dice_mean": float(array.mean()), "dice_sd": _spread(array)}


def _spread(values) -> float | None:
    """Sample sd; None for one value, whose spread is unknown (not zero)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def _mean_defined(values) -> float | None:
    defined = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(defined)) if defined else None


def paired_test(after: Sequence[float], before: Sequence[float],
                confidence: float = 0.95) -> tuple[float, float, float]:
    """The paired t-test's p and the ``confidence`` interval of the mean delta ``after - before``
    (is a gain of G excluded?); NaN where a single pair leaves them undefined."""
    from scipy import stats

    if len(after) < 2:
        return (float("nan"),) * 3
    test = stats.ttest_rel(after, before)
    low, high = test.confidence_interval(confidence)
    return float(test.pvalue), float(low), float(high)


def _paired_delta(after: list[float], before: list[float]) -> dict:
    """The paired Dice deltas' mean and sd, the paired t-test's p and its 95 % interval; None where
    one seed leaves them undefined."""
    delta = np.subtract(after, before)
    p_value, *interval = paired_test(after, before)
    return {"mean": float(np.mean(delta)), "sd": _spread(delta),
            "p": float(p_value) if np.isfinite(p_value) else None,
            "ci95": [float(interval[0]), float(interval[1])] if np.isfinite(interval).all() else None}


def build_report(per_seed: dict, settings: EvaluateSettings, record: dict, split: Split, unlabeled_on: bool,
                 seconds: float, duplicates: list[dict]) -> dict:
    seeds = sorted(per_seed)

    def dice(arm: str, keep: np.ndarray | None = None) -> list[float]:
        """``arm``'s test Dice per seed, over the test cases in ``keep`` (all when None)."""
        return [arm_dice(per_seed[s]["arms"][arm], keep) for s in seeds]

    report: dict = {}
    for arm in settings.arms:
        report[arm] = {**_summary(dice(arm)),
                       "hd95_mean": _mean_defined(per_seed[s]["arms"][arm]["hd95_mean"] for s in seeds),
                       "late_val_gain_mean": _mean_defined(per_seed[s]["arms"][arm]["late_val_gain"] for s in seeds),
                       "per_seed": [{"seed": s, "dice": per_seed[s]["arms"][arm]["dice_mean"],
                                     "hd95": per_seed[s]["arms"][arm]["hd95_mean"],
                                     "repeats": per_seed[s]["arms"][arm]["repeats"],
                                     "best_step": per_seed[s]["arms"][arm]["history"]["best_step"],
                                     "steps_run": len(per_seed[s]["arms"][arm]["history"]["loss"])}
                                    for s in seeds]}
    comparisons = [(arm, "real_only", "" if arm == "real_plus_synthetic" else f"_{arm}")
                   for arm in settings.arms if arm != "real_only"]
    comparisons += [(arm, baseline, f"_{name}") for arm, baseline, name, _ in COMPARISONS
                    if arm in settings.arms and baseline in settings.arms]
    for arm, baseline, suffix in comparisons:
        paired = _paired_delta(dice(arm), dice(baseline))
        report[f"delta_dice{suffix}_mean"], report[f"delta_dice{suffix}_sd"] = paired["mean"], paired["sd"]
        report[f"paired_p_value{suffix}"], report[f"delta_dice{suffix}_ci95"] = paired["p"], paired["ci95"]
    flagged = {duplicate["test"] for duplicate in duplicates}
    keep = np.array([image not in flagged for image, _ in split.test])
    report["near_duplicates"] = {"ncc_threshold": NEAR_DUPLICATE_NCC, "test_cases": duplicates}
    if flagged and keep.any():  # the same figures on the test cases no training case resembles
        report["near_duplicates"]["without_them"] = {
            **{arm: _summary(dice(arm, keep)) for arm in settings.arms},
            **{f"delta_dice{suffix}": _paired_delta(dice(arm, keep), dice(baseline, keep))
               for arm, baseline, suffix in comparisons}}
    for key in SYNTHETIC_METRICS:
        report[key] = _mean_defined(per_seed[s].get(key) for s in seeds)
    report["per_seed_synthetic"] = [{"seed": s, **{k: v for k, v in per_seed[s].items()
                                                   if k not in ("arms", "timings")}}
                                    for s in seeds]
    report["settings"] = {**record, "train_cases": len(split.train), "test_cases": len(split.test),
                          "unlabeled_pool_used": unlabeled_on,
                          "metrics": {"dice": "per test case over all its slices at the segmenter resolution; "
                                              "both empty = 1",
                                      "hd95": "slice-wise, segmenter px, where both sides hold foreground",
                                      "frd": "Frechet distance of weight-free radiomic lesion features "
                                             "(quality.lesion_features, z-scored over both sets), synthetic "
                                             "vs the K real lesions (frd-score is not installed)",
                                      "kid": "KID (cubic polynomial MMD^2) on the real-only segmenter's "
                                             "lesion-pooled encoder features",
                                      "memorization": f"lesion box NCC > {MEMORIZATION_NCC} with a training lesion",
                                      "shape_diversity_ratio": "mean 1 - IoU over pairs of lesion outlines (each "
                                                               "box scaled to a square), synthetic / the K real "
                                                               "lesions' (0: one outline repeated)",
                                      "faithfulness_ratio": "real-only segmenter's Dice on synthetic "
                                                            "pairs / on the test cases",
                                      "near_duplicates": f"test cases whose whole image (carried to "
                                                         f"{FINGERPRINT_PX} px; volumes to {FINGERPRINT_SLICES} "
                                                         "slices) correlates (NCC) above ncc_threshold with a "
                                                         "training case of the --train CSV"}}
    report["timings"] = {"total_seconds": round(sum(unit["seconds"] for s in seeds
                                                    for unit in per_seed[s]["timings"].values()), 1),
                         "this_invocation_seconds": round(seconds, 1),
                         "per_seed": {s: per_seed[s]["timings"] for s in seeds},
                         "peak_memory": "rss: the process's peak so far (MB); gpu: the unit's peak allocation"}
    return report


# ---------------------------------------------------------------------------------------------
# Report files


def _number(value, digits: int = 3, scale: float = 1.0) -> str:
    return "n/a" if value is None else f"{value * scale:.{digits}f}"


DELTA_MEANINGS = (("", "real + synthetic - real only"),) + tuple((f"_{name}", meaning)
                                                                  for _, _, name, meaning in COMPARISONS)


def _without_them(without: dict | None, arms: list[str]) -> str:
    """report.md's sentence on the test cases left once the near-duplicates are set aside."""
    if without is None:
        return ""
    deltas = [f"{meaning} {_number(without[f'delta_dice{suffix}']['mean'], 2, scale=100)} points "
              f"(p = {_number(without[f'delta_dice{suffix}']['p'])})"
              for suffix, meaning in DELTA_MEANINGS if f"delta_dice{suffix}" in without]
    return (" Without them, Dice " + ", ".join(f"{arm} {_number(without[arm]['dice_mean'])}" for arm in arms)
            + "".join(f"; {delta}" for delta in deltas) + ".")


def report_markdown(report: dict, arms: list[str]) -> str:
    settings = report["settings"]
    lines = ["# MedDiffFT evaluation", "",
             f"K = {settings['k']} labeled cases per seed, {len(report['real_only']['per_seed'])} seed(s) "
             f"(a different random K-subset each), {settings['test_cases']} test cases, "
             f"unlabeled pool for the backbone: {'on' if settings['unlabeled_pool_used'] else 'off'}; "
             f"{settings['seg_repeats']} segmenter(s) per arm and seed ({settings['segmenter']['lr_schedule']} "
             "learning rate), Dice averaged; "
             + ("every arm trained for the same steps" if settings["seg_budget"] == "same-steps"
                else "every arm made the same passes over the real cases (a mixed arm trained longer)")
             + f" (--seg-budget {settings['seg_budget']}).", "",
             "| arm | Dice mean | Dice sd | HD95 mean (px) | late validation gain (points) | per seed |",
             "|---|---|---|---|---|---|"]
    for arm in arms:
        row = report[arm]
        seeds = ", ".join(_number(s["dice"]) for s in row["per_seed"])
        gain = row["late_val_gain_mean"]
        lines.append(f"| {arm} | {_number(row['dice_mean'])} | {_number(row['dice_sd'])} | "
                     f"{_number(row['hd95_mean'], 1)} | {_number(gain, 2, scale=100)} | {seeds} |")
    lines += ["", "Late validation gain: mean validation Dice over the last quarter of the budget minus the "
              "quarter before; about 0 once an arm has plateaued.", ""]
    rising = [arm for arm in arms if (report[arm]["late_val_gain_mean"] or 0.0) * 100 > PLATEAU_POINTS]
    if rising:
        lines += [f"**Still rising:** {', '.join(rising)} gained more than {PLATEAU_POINTS} point on validation in "
                  "the last quarter of its budget; more --seg-epochs may raise it (on BUSI real-only "
                  "segmenters whose last quarter gained 0.8 point on average gained 1.3 points of test Dice "
                  "when their budget doubled), so compare the arms again with a larger budget.", ""]
    for suffix, meaning in DELTA_MEANINGS:
        if f"delta_dice{suffix}_mean" in report:
            interval = report[f"delta_dice{suffix}_ci95"]
            lines.append(f"Delta Dice ({meaning}): {_number(report[f'delta_dice{suffix}_mean'], 2, scale=100)} "
                         f"+- {_number(report[f'delta_dice{suffix}_sd'], 2, scale=100)} points"
                         + (" (95 % interval {} to {})".format(*(_number(b, 2, scale=100) for b in interval))
                            if interval else "")
                         + f", paired t-test p = {_number(report[f'paired_p_value{suffix}'])}.")
    near = report["near_duplicates"]
    if near["test_cases"]:
        lines.append(f"**Near-duplicates:** {len(near['test_cases'])} of {settings['test_cases']} test cases "
                     f"correlate above {near['ncc_threshold']} with a training case as whole images (listed in "
                     "report.json): the segmenters may have seen them, under another file name."
                     + _without_them(near.get("without_them"), arms))
    else:
        lines.append(f"No test case correlates above {near['ncc_threshold']} with a training case "
                     "(whole-image NCC).")
    for key in SYNTHETIC_METRICS:
        if key in report:
            lines.append(f"- {key}: {_number(report[key], 4)}")
    if any("synthetic" in ARMS[arm][1] for arm in arms):
        used = [f"{row['synthetic_pairs_used']}/{row['synthetic_pairs']}" for row in report["per_seed_synthetic"]]
        mixing = settings["segmenter"]
        lines.append(f"- synthetic pairs the segmenter trained on (of those generated; --faithful-min-dice "
                     f"{settings['faithful_min_dice']}): {', '.join(used)}; {mixing['synthetic_fraction']} of "
                     f"each batch in the first {mixing['synthetic_until']} of its steps (--synthetic-fraction, "
                     f"--synthetic-until); painted into the {settings['backgrounds']} images (--backgrounds)")
    pseudo = [row["pseudo_labels"] for row in report["per_seed_synthetic"] if "pseudo_labels" in row]
    if pseudo:
        lines.append("- pool images pseudo-labeled (the real-only segmenters agree at Dice >= "
                     f"{PSEUDO_MIN_AGREEMENT}): " + ", ".join(f"{p['pseudo_labeled']}/{p['pool']}" for p in pseudo)
                     + "; their Dice against the pool's own labels (a diagnosis; nothing trains on those labels): "
                     + ", ".join(_number(p["pseudo_label_dice"]) for p in pseudo))
    if "real_plus_copy_paste" in arms:
        qa = [row.get("copy_paste_qa") for row in report["per_seed_synthetic"]]
        lines.append("- copy-paste pairs: " + ("through the generation's QA (memorization not judged), kept "
                                               + ", ".join(f"{q['kept']}/{q['candidates']}" for q in qa)
                                               if all(qa) else "not filtered (no QA reference)")
                     + f"; pasted into the {settings['backgrounds']} images (--backgrounds)")
    lines += ["", f"Total time: {report['timings']['total_seconds']} s. Plots: dice_per_seed.png, "
              "samples_grid.png, loss_curves.png.", ""]
    return "\n".join(lines)


def _save_figure(figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_file(path) as tmp:
        figure.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(figure)


def write_report(out: Path, report: dict, per_seed: dict, real, synthetic) -> None:
    """report.json, report.md and the plots (Dice per arm per seed, real vs synthetic samples, the
    training loss and validation Dice curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [arm for arm in ARMS if arm in report]
    seeds = sorted(per_seed)
    figure, axes = plt.subplots(figsize=(1.8 * len(arms) + 2, 3.5))
    for seed in seeds:
        axes.plot(arms, [per_seed[seed]["arms"][arm]["dice_mean"] for arm in arms], marker="o", label=f"seed {seed}")
    axes.set_ylabel("test Dice")
    axes.legend(fontsize=7)
    _save_figure(figure, out / "dice_per_seed.png")

    columns = 6
    figure, axes = plt.subplots(2, columns, figsize=(2 * columns, 4.2), squeeze=False)
    for row, (name, pairs) in enumerate((("real", real), ("synthetic", synthetic))):
        for col in range(columns):
            axis = axes[row][col]
            axis.axis("off")
            if pairs is not None and col < len(pairs[0]):
                axis.imshow(pairs[0][col, 0], cmap="gray", vmin=0, vmax=1)
                axis.contour(pairs[1][col, 0], levels=[0.5], colors="orange", linewidths=0.8)
                axis.set_title(f"{name} {col + 1}", fontsize=8)
    _save_figure(figure, out / "samples_grid.png")

    figure, (loss_axis, dice_axis) = plt.subplots(1, 2, figsize=(11, 3.8))
    for seed in seeds:
        for arm in arms:
            history = per_seed[seed]["arms"][arm]["history"]
            loss = np.asarray(history["loss"])
            window = max(1, len(loss) // 50)
            smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
            loss_axis.plot(smooth, label=f"{arm} s{seed}", linewidth=0.8)
            if history["val_dice"]:
                steps, dice = zip(*history["val_dice"])
                dice_axis.plot(steps, dice, label=f"{arm} s{seed}", linewidth=0.8)
    loss_axis.set(title="training loss (moving mean)", xlabel="step")
    dice_axis.set(title="validation Dice", xlabel="step")
    dice_axis.legend(fontsize=6)
    _save_figure(figure, out / "loss_curves.png")

    with atomic_file(out / "report.md") as tmp:
        tmp.write_text(report_markdown(report, arms))
    write_json(out / "report.json", report)
