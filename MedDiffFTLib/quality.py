"""Quality assessment: score every sample against the real training lesions and reject bad ones.

Five checks, each with a threshold calibrated at fine-tune time on real-vs-real scores of the
training data (so "as good as the real lesions are among themselves", not a hand-picked constant):
a one-sided Student-t prediction bound that a new real lesion meets with the chosen probability,
wide when the training cases are few.

- realism: distance of the lesion's weight-free radiomic features (first-order statistics and
  texture relative to the surrounding tissue) to its nearest real lesions, each feature scaled by
  its spread over real lesions and plain tissue; calibrated by leave-one-case-out distances of the
  real lesions (frd-score's radiomic extractor needs pyradiomics, which has no wheel for this
  Python on PyPI, so the features are computed here with scipy);
- paint: the lesion must stand out from its ring of tissue like real lesions do, and more than
  plain tissue does (the real masks moved onto lesion-free tissue give that null contrast), and
  the image must have changed inside the guide mask at all;
- memorization: the highest SSIM of the lesion ROI to any training lesion ROI; a sample may be no
  closer to a training lesion than real lesions of different cases are to each other, and never
  above the copy level (``copy_ssim``);
- faithfulness: Dice of a small segmenter's prediction against the guide mask. The segmenters are
  cross-fitted over the training cases: a sample is scored by one that never saw its background
  image (a segmenter that memorised an image is fooled by it); its threshold comes from the
  segmenters' Dice on their held-out real cases. With one training case cross-fitting is
  impossible: the Dice is reported but not used to reject;
- healed: where the background's own lesion was painted over, the same segmenter must find no
  more lesion than it finds on real lesion-free tissue of a lesion's shape (the held-out cases'
  masks moved onto nearby tissue); a half-healed lesion left under a background label teaches a
  downstream segmenter to miss lesions.

The reference (real features, ROIs, contrasts, fold segmenters) lives in the model folder's
``quality/`` as safetensors; thresholds go to the model card under ``"quality"``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from scipy import ndimage, stats

from .caseio import Case, image_key
from .errors import MedDiffFTError
from .generate import Sample
from .masks import dilate
from .progress import Progress
from .segmenter import (SegmenterSettings, build_model, dice_per_image, planes_to_tensor, predict,
                        train_segmenter)
from .slicing import choose_axis, fit_intensity, slice_stack, to_channels, window_around

QUALITY_DIR = "quality"
REFERENCE_FILE = "reference.safetensors"
FEATURES = ("contrast", "log_std_ratio", "skewness", "kurtosis", "entropy", "log_gradient_ratio",
            "log_laplacian_ratio", "edge_strength", "p10", "p90")
ROI_CONTEXT = 0.25  # memorization ROI: the lesion's box plus this fraction of its size per side


@dataclass
class QualitySettings:
    """How the quality reference is built (CLI names in brackets): share of real lesions each
    calibrated check lets pass [--qa-percentile], copy level of the memorization guard, real
    neighbours of the realism score, memorization ROI side in px, cross-fitting folds [--qa-folds],
    segmenter steps [--qa-segmenter-steps] and input side [--qa-segmenter-resolution]."""

    percentile: float = 95.0
    copy_ssim: float = 0.95
    neighbours: int = 3
    roi_size: int = 48
    folds: int = 3
    segmenter_steps: int = 300
    segmenter_resolution: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if not 50.0 <= self.percentile < 100.0:
            raise MedDiffFTError(f"--qa-percentile {self.percentile}: use a value in [50, 100), e.g. 95.")
        if self.folds < 2:
            raise MedDiffFTError(f"--qa-folds {self.folds}: use at least 2 (cross-fitting folds).")
        if self.segmenter_steps <= 0:
            raise MedDiffFTError("--qa-segmenter-steps must be positive.")
        if self.segmenter_resolution < 16 or self.segmenter_resolution % 8:
            raise MedDiffFTError(f"--qa-segmenter-resolution {self.segmenter_resolution}: use a "
                                 "multiple of 8 of at least 16 (e.g. 64).")

    def segmenter(self, fold: int) -> SegmenterSettings:
        return SegmenterSettings(resolution=self.segmenter_resolution, max_steps=self.segmenter_steps,
                                 patience=0, seed=self.seed + fold)


# ---------------------------------------------------------------------------------------------
# Measurements on one slice


@dataclass
class LesionSlices:
    """The slices of an image that hold a mask: grey planes normalized like the model's input
    ([-1, 1]), the planes as stored (segmenter input) and the masks."""

    planes: list[np.ndarray]
    stored: list[np.ndarray]
    masks: list[np.ndarray]


def lesion_slices(image: np.ndarray, mask: np.ndarray, spacing, is_2d: bool, slices_card: dict) -> LesionSlices:
    axis = choose_axis(spacing, slices_card["axis"], is_2d)
    grey = slice_stack(to_channels(fit_intensity(image, slices_card["intensity"]).forward(image), 1), axis)
    stored, masks = slice_stack(image, axis), slice_stack(mask, axis)
    holding = [s for s in range(len(masks)) if masks[s].any()]
    return LesionSlices([grey[s] for s in holding], [stored[s] for s in holding],
                        [masks[s].astype(bool) for s in holding])


def _ring_width(mask: np.ndarray) -> float:
    """A quarter of the lesion's equivalent radius, at least 2 px."""
    return max(2.0, 0.25 * np.sqrt(mask.sum() / np.pi))


def _ring(mask: np.ndarray) -> np.ndarray:
    """Tissue around a lesion, ``_ring_width`` wide."""
    ring = dilate(mask, _ring_width(mask)) & ~mask
    return ring if ring.any() else ~mask if (~mask).any() else mask


def contrast(plane: np.ndarray, mask: np.ndarray) -> float:
    """(mean inside - mean of the ring) / spread of the ring."""
    around = plane[_ring(mask)]
    return float((plane[mask].mean() - around.mean()) / (around.std() + 1e-3))


def lesion_features(plane: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Weight-free radiomic features of a lesion, relative to its ring of tissue (``FEATURES``)."""
    ring = _ring(mask)
    inside, around = plane[mask].astype(np.float64), plane[ring].astype(np.float64)
    spread = around.std() + 1e-3
    gradient = ndimage.gaussian_gradient_magnitude(plane.astype(np.float64), 1.0)
    laplacian = np.abs(ndimage.gaussian_laplace(plane.astype(np.float64), 1.0))
    edge = mask & ~ndimage.binary_erosion(mask)
    counts = np.histogram(inside, bins=32, range=(-1.0, 1.0))[0] / inside.size
    counts = counts[counts > 0]
    values = [(inside.mean() - around.mean()) / spread,
              np.log((inside.std() + 1e-3) / spread),
              stats.skew(inside), stats.kurtosis(inside),
              -(counts * np.log2(counts)).sum(),
              np.log((gradient[mask].mean() + 1e-6) / (gradient[ring].mean() + 1e-6)),
              np.log((laplacian[mask].mean() + 1e-6) / (laplacian[ring].mean() + 1e-6)),
              gradient[edge].mean() / spread,
              (np.percentile(inside, 10) - around.mean()) / spread,
              (np.percentile(inside, 90) - around.mean()) / spread]
    return np.nan_to_num(np.asarray(values, dtype=np.float64))


def lesion_roi(plane: np.ndarray, mask: np.ndarray, size: int) -> torch.Tensor:
    """(1, size, size): the lesion's box plus context, carried to ``size`` px (memorization guard)."""
    return window_around(mask, size, roi="on", context=ROI_CONTEXT, scale="fit").extract(plane)


def tissue_masks(mask: np.ndarray) -> list[np.ndarray]:
    """The lesion's mask moved onto nearby tissue (one and a half box sizes away in eight
    directions, inside the slice, clear of the lesion and its ring): regions without a lesion."""
    ys, xs = np.nonzero(mask)
    height, width = mask.shape
    box_h, box_w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    keep_out = dilate(mask, 2 * _ring_width(mask))
    out = []
    for dy, dx in [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1) if (a, b) != (0, 0)]:
        oy, ox = int(round(1.5 * dy * box_h)), int(round(1.5 * dx * box_w))
        if not (0 <= ys.min() + oy and ys.max() + oy < height and 0 <= xs.min() + ox and xs.max() + ox < width):
            continue
        moved = np.zeros_like(mask)
        moved[ys + oy, xs + ox] = True
        if not (moved & keep_out).any():
            out.append(moved)
    return out


def _ssim_to_reference(rois: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """(N, M) SSIM of each ROI to each reference ROI (intensities in [-1, 1])."""
    from monai.metrics import SSIMMetric

    if len(reference) == 0 or len(rois) == 0:
        return np.zeros((len(rois), len(reference)))
    metric = SSIMMetric(spatial_dims=2, data_range=2.0, win_size=7)
    pairs_a = rois.repeat_interleave(len(reference), dim=0)
    pairs_b = reference.repeat(len(rois), 1, 1, 1)
    return metric(pairs_a, pairs_b).reshape(len(rois), len(reference)).numpy().astype(np.float64)


def _standardization(lesions: np.ndarray, tissue: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre: the real lesions' mean features; spread: per feature, over real lesions and plain
    tissue together (a few lesions alone give unstable spreads; constant features: spread 1)."""
    scale = np.concatenate([lesions, tissue]).std(axis=0)
    return lesions.mean(axis=0), np.where(scale > 1e-6, scale, 1.0)


def _knn_distance(features: np.ndarray, reference: np.ndarray, neighbours: int) -> np.ndarray:
    """Mean Euclidean distance of each (standardized) feature row to its nearest reference rows."""
    distances = np.linalg.norm(features[:, None, :] - reference[None, :, :], axis=-1)
    k = min(neighbours, reference.shape[0])
    return np.sort(distances, axis=1)[:, :k].mean(axis=1)


# ---------------------------------------------------------------------------------------------
# Reference: built at fine-tune time


def _segmenter_data(cases: list[Case], slices_card: dict, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every labeled slice of the cases (lesion-free ones too) as segmenter tensors."""
    planes, masks = [], []
    for case in cases:
        axis = choose_axis(case.spacing, slices_card["axis"], case.is_2d)
        planes += list(slice_stack(case.image, axis))
        masks += list(slice_stack(case.foreground, axis))
    return planes_to_tensor(planes, resolution), planes_to_tensor(masks, resolution, is_mask=True)


def prediction_bound(values, q: float, *, upper: bool) -> float | None:
    """The bound a new real score stays within with probability ``q`` % (one-sided Student-t
    prediction interval of the real-vs-real scores: wide when they are few); None below 2 values."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return None
    spread = values.std(ddof=1) * np.sqrt(1.0 + 1.0 / values.size) * stats.t.ppf(q / 100.0, values.size - 1)
    return float(values.mean() + spread if upper else values.mean() - spread)


def build_reference(cases: list[Case], slices_card: dict, settings: QualitySettings, *,
                    model_out: Path, device: torch.device, progress: Progress) -> dict:
    """Measure the real lesions, train the fold segmenters, calibrate the thresholds; write
    ``model_out/quality/`` and return the model card entry."""
    q = settings.percentile
    features, rois, contrasts, owner = [], [], [], []
    tissue, tissue_owner = [], []
    for index, case in enumerate(cases):
        found = lesion_slices(case.image, case.foreground, case.spacing, case.is_2d, slices_card)
        for plane, mask in zip(found.planes, found.masks):
            features.append(lesion_features(plane, mask))
            rois.append(lesion_roi(plane, mask, settings.roi_size))
            contrasts.append(contrast(plane, mask))
            owner.append(index)
            for moved in tissue_masks(mask):
                tissue.append(lesion_features(plane, moved))
                tissue_owner.append(index)
    if not features:
        raise MedDiffFTError("Quality assessment needs real lesions: draw the lesion in at least one "
                             "training case, or pass --qa off.")
    features, owner = np.stack(features), np.asarray(owner)
    tissue, tissue_owner = np.reshape(tissue, (-1, len(FEATURES))), np.asarray(tissue_owner)
    centre, scale = _standardization(features, tissue)
    rois = torch.stack(rois)
    ssim = _ssim_to_reference(rois, rois)
    realism_loo, ssim_loo = [], []
    for index in range(len(cases)):  # the left-out case is new to the standardization too
        own, other = owner == index, owner != index
        if own.any() and other.any():
            other_centre, other_scale = _standardization(features[other], tissue[tissue_owner != index])
            realism_loo += list(_knn_distance((features[own] - other_centre) / other_scale,
                                              (features[other] - other_centre) / other_scale,
                                              settings.neighbours))
            ssim_loo += list(ssim[np.ix_(own, other)].max(axis=1))
    direction = 1.0 if np.median(contrasts) >= 0 else -1.0
    paint_bounds = [bound for bound in (
        prediction_bound(direction * np.asarray(contrasts), q, upper=False),
        prediction_bound(direction * tissue[:, FEATURES.index("contrast")], q, upper=True)) if bound is not None]

    folds = min(settings.folds, len(cases))  # one case: one segmenter, no cross-fitting
    fold_of = np.arange(len(cases)) % folds
    directory = model_out / QUALITY_DIR
    directory.mkdir(parents=True, exist_ok=True)
    held_out_dice, segmenters, models = [], [], []
    for fold in range(folds):
        train_cases = [c for c, f in zip(cases, fold_of) if f != fold or folds == 1]
        images, masks = _segmenter_data(train_cases, slices_card, settings.segmenter_resolution)
        model, _ = train_segmenter(images, masks, settings.segmenter(fold), device=device, progress=progress)
        for case in (c for c, f in zip(cases, fold_of) if f == fold and folds > 1):
            found = lesion_slices(case.image, case.foreground, case.spacing, case.is_2d, slices_card)
            held_out_dice += list(_faithfulness(model, found, settings.segmenter_resolution))
        name = f"segmenter_fold{fold}.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(directory / name))
        segmenters.append(name)
        models.append(model)
    save_file({"features": torch.from_numpy((features - centre) / scale), "rois": rois.contiguous(),
               "centre": torch.from_numpy(centre), "scale": torch.from_numpy(scale)},
              str(directory / REFERENCE_FILE))
    faithfulness = max(0.0, prediction_bound(held_out_dice, q, upper=False) or 0.0) if folds > 1 else None
    healed, tissue_detected = (healed_bound(cases, fold_of, models, slices_card, settings) if folds > 1
                               else (None, None))
    return {
        "settings": asdict(settings),
        "features": list(FEATURES),
        "real_lesion_slices": len(features),
        "cases": [image_key(c.image) for c in cases],
        "fold_of_case": [int(f) for f in fold_of],
        "segmenters": segmenters,
        "cross_fit": folds > 1,
        "contrast_direction": direction,
        "thresholds": {
            "realism_max_distance": prediction_bound(realism_loo, q, upper=True),
            "paint_min_contrast": min(paint_bounds, default=0.0),
            "memorization_max_ssim": max(settings.copy_ssim, prediction_bound(ssim_loo, q, upper=True) or 0.0),
            "faithfulness_min_dice": faithfulness,
            "healed_max_detected": healed,
        },
        "calibration": {
            "percentile": q,
            "realism_real_distances": _summary(realism_loo),
            "real_contrasts": _summary(direction * np.asarray(contrasts)),
            "tissue_contrasts": _summary(direction * tissue[:, FEATURES.index("contrast")]),
            "real_ssim_to_other_cases": _summary(ssim_loo),
            "held_out_dice": _summary(held_out_dice),
            "tissue_detected": tissue_detected,
            "notes": _calibration_notes(len(cases), len(tissue) > 0),
        },
    }


def healed_bound(cases: list[Case], fold_of, models: list[torch.nn.Module], slices_card: dict,
                 settings: QualitySettings) -> tuple[float | None, dict | None]:
    """The most lesion a healed place may show (the threshold ``healed_max_detected``) and a summary
    of the values it comes from (calibration ``tissue_detected``): what each fold's segmenter finds
    on its held-out cases' lesion-free tissue (their masks moved onto nearby tissue,
    ``tissue_masks``), as a prediction bound."""
    values: list[float] = []
    for case, fold in zip(cases, fold_of):
        found = lesion_slices(case.image, case.foreground, case.spacing, case.is_2d, slices_card)
        for stored, mask in zip(found.stored, found.masks):
            moved = tissue_masks(mask)
            values += list(_detected(models[fold], [stored] * len(moved), moved, settings.segmenter_resolution))
    bound = prediction_bound(values, settings.percentile, upper=True)
    return (None if bound is None else min(1.0, max(0.0, bound))), _summary(values)


def _summary(values) -> dict | None:
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return None
    return {"n": int(values.size), "min": round(float(values.min()), 4),
            "median": round(float(np.median(values)), 4), "max": round(float(values.max()), 4)}


def _calibration_notes(cases: int, tissue_found: bool) -> list[str]:
    notes = []
    if cases < 2:
        notes.append("One training case: realism cannot be calibrated (no other case to compare "
                     "with) and cross-fitting is impossible (the segmenter saw the background); "
                     "both are reported, not used to reject. Fine-tune on two or more cases.")
    if not tissue_found:
        notes.append("No lesion-free tissue of the lesion's size next to the real lesions: the "
                     "paint threshold comes from the real lesions' contrast alone.")
    return notes


def _predicted(model: torch.nn.Module, planes: list[np.ndarray], regions: list[np.ndarray],
               resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The segmenter's prediction and the regions, at its resolution, for the planes whose region
    survives resizing (bool, (N, 1, R, R))."""
    images = planes_to_tensor(planes, resolution)
    masks = planes_to_tensor(regions, resolution, is_mask=True) > 0
    visible = masks.flatten(1).any(dim=1)
    return predict(model, images[visible]), masks[visible]


def _detected(model: torch.nn.Module, planes: list[np.ndarray], regions: list[np.ndarray],
              resolution: int) -> np.ndarray:
    """Per plane: the share of the region the segmenter marks as lesion."""
    prediction, masks = _predicted(model, planes, regions, resolution)
    return ((prediction & masks).flatten(1).sum(1) / masks.flatten(1).sum(1).clamp_min(1)).numpy().astype(np.float64)


def _faithfulness(model: torch.nn.Module, found: LesionSlices, resolution: int) -> np.ndarray:
    """Per-slice Dice of the segmenter against the masks."""
    prediction, masks = _predicted(model, found.stored, found.masks, resolution)
    return dice_per_image(prediction, masks) if len(masks) else np.zeros(0)


# ---------------------------------------------------------------------------------------------
# Scoring samples


class QualityFilter:
    """Scores samples against a model folder's quality reference (a ``SampleFilter``)."""

    name = "qa"

    def __init__(self, entry: dict, slices_card: dict, reference: dict[str, torch.Tensor],
                 segmenters: list[torch.nn.Module]) -> None:
        self.entry = entry
        self.slices_card = slices_card
        self.reference = reference
        self.segmenters = segmenters
        self.thresholds = entry["thresholds"]
        self.settings = QualitySettings(**entry["settings"])

    @classmethod
    def load(cls, model_dir: str | Path, card: dict, device: torch.device) -> "QualityFilter":
        if "quality" not in card:
            raise MedDiffFTError(f"The model {model_dir} has no quality reference (it was fine-tuned "
                                 "with --qa off or without labeled lesions): fine-tune it again with "
                                 "--qa on, or sample with --qa off.")
        entry = card["quality"]
        directory = Path(model_dir) / QUALITY_DIR
        reference = load_file(str(directory / REFERENCE_FILE))
        segmenters = []
        for name in entry["segmenters"]:
            model = build_model()
            model.load_state_dict(load_file(str(directory / name)))
            segmenters.append(model.to(device).eval())
        return cls(entry, card["slices"], reference, segmenters)

    def _segmenter_for(self, background: Case) -> tuple[torch.nn.Module, bool]:
        """The fold segmenter that never trained on ``background`` (and whether that holds)."""
        key = image_key(background.image)
        if key in self.entry["cases"]:
            fold = self.entry["fold_of_case"][self.entry["cases"].index(key)]
            return self.segmenters[fold], self.entry["cross_fit"]
        return self.segmenters[0], True

    def assess(self, sample: Sample, source: Case, *, check_memorization: bool = True) -> tuple[bool, dict]:
        """Scores and verdict; ``check_memorization=False`` reports the memorization SSIM without
        judging it (for pairs that copy a training lesion by design, such as copy-paste)."""
        background = sample.background
        found = lesion_slices(sample.image, sample.guide, background.spacing, background.is_2d,
                              self.slices_card)
        if not found.masks:
            return False, {"passed": False, "reason": "empty guide mask: nothing to assess"}
        changed = sample.image != background.image
        if changed.ndim > sample.guide.ndim:
            changed = changed.any(axis=-1)
        scores: dict = {"changed_fraction": round(float(changed[sample.guide].mean()), 4)}
        features = np.stack([lesion_features(p, m) for p, m in zip(found.planes, found.masks)])
        standardized = (features - self.reference["centre"].numpy()) / self.reference["scale"].numpy()
        scores["realism_distance"] = float(_knn_distance(
            standardized, self.reference["features"].numpy(), self.settings.neighbours).mean())
        direction = self.entry["contrast_direction"]
        scores["contrast"] = float(np.mean([direction * contrast(p, m)
                                            for p, m in zip(found.planes, found.masks)]))
        rois = torch.stack([lesion_roi(p, m, self.settings.roi_size) for p, m in zip(found.planes, found.masks)])
        scores["memorization_ssim"] = float(_ssim_to_reference(rois, self.reference["rois"]).max())
        model, cross_fit = self._segmenter_for(background)
        labeled = lesion_slices(sample.image, sample.guide | sample.foreground, background.spacing,
                                background.is_2d, self.slices_card)  # with a kept or pasted-beside lesion
        dice = _faithfulness(model, labeled, self.settings.segmenter_resolution)
        scores["faithfulness_dice"] = float(dice.mean()) if dice.size else None
        healed = background.foreground & sample.regenerated & ~sample.guide  # the background's lesion, painted over
        old = lesion_slices(sample.image, healed, background.spacing, background.is_2d, self.slices_card)
        detected = _detected(model, old.stored, old.masks, self.settings.segmenter_resolution)
        scores["healed_detected"] = float(detected.mean()) if detected.size else None
        scores["cross_fit"] = cross_fit
        if not cross_fit:
            scores["cross_fit_note"] = ("cross-fitting impossible: the segmenter trained on this "
                                        "background (one training case); Dice not used to reject")
        scores = {k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}
        reasons, margins = self._judge(scores, cross_fit, check_memorization)
        scores["overall"] = round(float(np.mean(margins)), 4)
        scores["passed"] = not reasons
        scores["reason"] = "; ".join(reasons) or None
        return not reasons, scores

    def _judge(self, scores: dict, cross_fit: bool, check_memorization: bool) -> tuple[list[str], list[float]]:
        """Reasons to reject, and each check's margin (positive = passes; higher = better)."""
        t = self.thresholds
        reasons, margins = [], []
        if scores["changed_fraction"] == 0:
            reasons.append("not painted: the image is unchanged inside the guide mask")
        paint = t["paint_min_contrast"]
        margins.append((scores["contrast"] - paint) / max(abs(paint), 1e-3))
        if scores["contrast"] < paint:
            reasons.append(f"not painted: lesion/ring contrast {scores['contrast']:.2f} below the "
                           f"calibrated {paint:.2f}")
        memo = t["memorization_max_ssim"]
        if check_memorization:
            margins.append((memo - scores["memorization_ssim"]) / memo)
            if scores["memorization_ssim"] > memo:
                reasons.append(f"memorized: SSIM {scores['memorization_ssim']:.3f} to a training lesion "
                               f"ROI above {memo:.3f}")
        realism = t["realism_max_distance"]
        if realism is not None:
            margins.append((realism - scores["realism_distance"]) / max(realism, 1e-3))
            if scores["realism_distance"] > realism:
                reasons.append(f"unrealistic: feature distance {scores['realism_distance']:.2f} to the "
                               f"real lesions above the calibrated {realism:.2f}")
        faithful = t["faithfulness_min_dice"]
        if faithful is not None and cross_fit and scores["faithfulness_dice"] is not None:
            margins.append(scores["faithfulness_dice"] - faithful)
            if scores["faithfulness_dice"] < faithful:
                reasons.append(f"mask not faithful: segmenter Dice {scores['faithfulness_dice']:.2f} "
                               f"vs the label below the calibrated {faithful:.2f}")
        healed = t.get("healed_max_detected")  # absent in model folders made before the check
        if healed is not None and cross_fit and scores["healed_detected"] is not None:
            margins.append(healed - scores["healed_detected"])
            if scores["healed_detected"] > healed:
                reasons.append(f"not healed: the segmenter finds a lesion on {scores['healed_detected']:.0%} "
                               f"of the removed lesion's place, above the calibrated {healed:.0%}")
        return reasons, margins

    def summary(self, kept: list[dict], rejected: list[dict], keep_best: int | None) -> dict:
        """The manifest's QA overview: thresholds, counts, and how often each check rejected (a sample
        whose lesion could not be placed never reached QA: "not placed")."""
        checks = Counter(check for entry in rejected for check in
                         ({part.split(":")[0] for part in (entry["reason"] or "").split("; ") if part}
                          if "qa" in entry else {"not placed"}))
        return {"kept": len(kept), "rejected": len(rejected), "keep_best": keep_best,
                "rejections_by_check": dict(checks), "thresholds": self.thresholds,
                "cross_fit": self.entry["cross_fit"], "calibration": self.entry["calibration"]}
