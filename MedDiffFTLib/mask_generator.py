"""The stochastic mask generator: a small diffusion model on binary lesion masks, and the mask
source that draws new lesions from it with hierarchical randomness.

Training data: every slice of every connected lesion of the training cases (along the slicing
axis), cropped to a square around the lesion and carried to ``resolution`` px, augmented with
flips, rotations and elastic warps (MONAI). Next to the UNet the model folder keeps the training
shapes (new shapes must differ from all of them) and each real lesion's area and centroid per
slice (a new 3D lesion is swept along a real lesion's smoothed profile) and its position in the
image frame (where ``placement="learned"`` puts new lesions).

Drawing one mask (one seed): shape (sample the model, threshold, largest component, fill holes),
geometry (area within the real range, rotation, flip, an elastic warp that is smooth across
slices), placement (inside the allowed region, away from the border and from other labels;
uniformly, or near a real lesion's relative position in its image).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.signal import fftconvolve

from .caseio import Case, read_case
from .errors import MedDiffFTError, PlacementError
from .masks import Proposal, largest_component
from .progress import Progress
from .slicing import bounding_box, choose_axis, slice_stack, to_channels

FOLDER = "mask_generator"
SHAPES_FILE = "training_shapes.safetensors"
LESIONS_FILE = "lesions.json"
BLOCKS = (16, 32, 64)
CROP_MARGIN = 1.5  # crop side / lesion extent: room for rotations
MIN_LESION_PX = 4
SAMPLING_STEPS = 20
CANDIDATES = 4  # shapes sampled per model call
MAX_TRIES = 16
NOVELTY_IOU = 0.95  # a new shape must overlap every training shape less than this
REAL_SIZE_SD = 0.25  # lesion_size real: log-normal spread around a real lesion's area (about +-28 %)
COVER_GROWTH = (1.0, 2.0)  # old_lesion cover: the new lesion's area over the old one's (largest slice)
COVER_SPREAD = 0.03  # old_lesion cover: sd of the new lesion's centre around the old one's (frame fraction)
COVER_MARGIN_PX = 2  # old_lesion cover: the old lesion, dilated by this, lies inside the new one


@dataclass
class MaskTrainSettings:
    """Mask-generator training [CLI: --mask-steps, --mask-resolution; the seed is --seed]."""

    steps: int = 300
    resolution: int = 32
    batch_size: int = 8
    learning_rate: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.resolution % 4 or self.resolution < 16:
            raise MedDiffFTError(f"--mask-resolution {self.resolution}: use a multiple of 4 of at "
                                 "least 16 (e.g. 32 or 64).")
        if self.steps <= 0:
            raise MedDiffFTError("--mask-steps must be 0 (no mask generator) or positive.")


@dataclass
class GeometryBounds:
    """Bounds of the geometry and placement randomness. ``area_slack`` widens the real lesions'
    area range (largest slice, px) on both sides; ``elastic`` is the warp's displacement as a
    fraction of the shape size; ``margin`` the distance kept from the slice border and from
    other labels, as a fraction of the slice's smaller side (at least 2 px); ``spread`` the
    standard deviation of a learned placement around a real lesion's position, as a fraction of
    the frame along each axis."""

    max_rotation: float = 30.0
    elastic: float = 0.03
    area_slack: float = 1.2
    margin: float = 0.03
    spread: float = 0.1


def canonical_shape(mask: np.ndarray, resolution: int) -> np.ndarray:
    """A 2D lesion cropped to a square ``CROP_MARGIN`` x its extent around its box centre, carried
    to ``resolution`` px (the frame the model learns and samples in)."""
    y0, y1, x0, x1 = bounding_box(mask)
    side = max(2, math.ceil(max(y1 - y0, x1 - x0) * CROP_MARGIN))
    top = round((y0 + y1 - side) / 2) + side
    left = round((x0 + x1 - side) / 2) + side
    crop = np.pad(mask, side)[top:top + side, left:left + side].astype(np.float32)
    tensor = torch.from_numpy(crop)[None, None]
    mode = "area" if side >= resolution else "bilinear"
    resized = F.interpolate(tensor, size=(resolution, resolution), mode=mode)[0, 0].numpy()
    return largest_component(resized > 0.5)


def collect_lesions(cases: list[Case], axis_spec: str, resolution: int) -> tuple[np.ndarray, list[dict]]:
    """(canonical shapes of every lesion slice, per lesion: area and centroid of each slice, and
    its centroid relative to the frame (slice, row, col; pixel centres, 0..1))."""
    shapes, lesions = [], []
    for case in cases:
        stack = slice_stack(case.foreground, choose_axis(case.spacing, axis_spec, case.is_2d))
        components, count = ndimage.label(stack)
        for index in range(1, count + 1):
            lesion = components == index
            held = [s for s in range(len(lesion)) if lesion[s].sum() >= MIN_LESION_PX]
            if not held:
                continue
            lesions.append({"areas": [int(lesion[s].sum()) for s in held],
                            "centroids": [[round(float(c), 2) for c in ndimage.center_of_mass(lesion[s])]
                                          for s in held],
                            "position": [round(float(p), 4) for p in
                                         frame_position(ndimage.center_of_mass(lesion), lesion.shape)]})
            shapes += [canonical_shape(lesion[s], resolution) for s in held]
    return np.asarray(shapes, dtype=bool).reshape(-1, resolution, resolution), lesions


def frame_position(index, shape) -> np.ndarray:
    """Voxel positions (..., axes) relative to the frame ``shape``: pixel centres span (0, 1)."""
    return (np.asarray(index, np.float64) + 0.5) / np.asarray(shape)


def _augmented_pool(shapes: np.ndarray, size: int, seed: int) -> torch.Tensor:
    """``size`` augmented copies of the training shapes as a (size, 1, R, R) tensor in {-1, 1}."""
    from monai.transforms import Compose, Rand2DElastic, RandFlip, RandRotate

    resolution = shapes.shape[-1]
    augment = Compose([
        RandFlip(prob=0.5, spatial_axis=1),
        RandRotate(range_x=math.pi / 6, prob=1.0, padding_mode="zeros"),
        Rand2DElastic(spacing=resolution // 4, magnitude_range=(0.0, 1.0), prob=0.8,
                      scale_range=(0.15, 0.15), padding_mode="zeros"),
    ])
    augment.set_random_state(seed)
    order = np.random.default_rng(seed).permutation(np.resize(np.arange(len(shapes)), size))
    pool = [np.asarray(augment(torch.from_numpy(shapes[i][None].astype(np.float32)))) > 0.5 for i in order]
    return torch.from_numpy(np.stack(pool).astype(np.float32)) * 2.0 - 1.0


def _create_unet(resolution: int):
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=resolution, in_channels=1, out_channels=1, block_out_channels=BLOCKS,
                       layers_per_block=1, down_block_types=("DownBlock2D",) * len(BLOCKS),
                       up_block_types=("UpBlock2D",) * len(BLOCKS), norm_num_groups=8)


def train_mask_generator(cases: list[Case], folder: Path, *, axis: str, settings: MaskTrainSettings,
                         device: torch.device, progress: Progress) -> dict:
    """Train the mask model on the cases' lesions and write it to ``folder``; returns the model
    card entry. Deterministic per seed (on one device)."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from safetensors.torch import save_file

    from .outputs import write_json

    started = time.monotonic()
    shapes, lesions = collect_lesions(cases, axis, settings.resolution)
    if not lesions:
        raise MedDiffFTError(f"The labels hold no lesion of at least {MIN_LESION_PX} px to train the "
                             "mask generator on: label the lesions, or pass --mask-steps 0 and sample "
                             "with --mask-source label or jitter.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        unet = _create_unet(settings.resolution).to(device)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                              prediction_type="sample", clip_sample=True)
    pool = _augmented_pool(shapes, min(512, settings.steps * settings.batch_size), settings.seed)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.learning_rate)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(20, settings.steps // 10), settings.steps)
    generator = torch.Generator().manual_seed(settings.seed)
    losses = []
    unet.train()
    with progress.stage("mask generator", settings.steps) as advance:
        for _ in range(settings.steps):
            clean = pool[torch.randint(len(pool), (settings.batch_size,), generator=generator)]
            noise = torch.randn(clean.shape, generator=generator)
            steps = torch.randint(0, scheduler.config.num_train_timesteps, (settings.batch_size,),
                                  generator=generator)
            noisy = scheduler.add_noise(clean, noise, steps)
            loss = F.mse_loss(unet(noisy.to(device), steps.to(device)).sample, clean.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            advance(1)
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    scheduler.save_pretrained(folder / "scheduler")
    save_file({"shapes": torch.from_numpy(shapes.astype(np.uint8))}, str(folder / SHAPES_FILE))
    write_json(folder / LESIONS_FILE, {"lesions": lesions})
    return {"folder": FOLDER, **asdict(settings), "parameters": sum(p.numel() for p in unet.parameters()),
            "training_shapes": len(shapes), "lesions": len(lesions),
            "final_loss": round(float(np.mean(losses[-20:])), 5),
            "seconds": round(time.monotonic() - started, 2)}


class MaskGenerator:
    """The trained mask model with its training shapes and real lesion profiles."""

    def __init__(self, unet, scheduler, shapes: np.ndarray, lesions: list[dict], device: torch.device):
        self.unet, self.scheduler, self.device = unet, scheduler, device
        self.shapes, self.lesions = shapes, lesions
        self.resolution = int(unet.config.sample_size)

    @classmethod
    def load(cls, model_dir: str | os.PathLike, device: torch.device) -> "MaskGenerator":
        from diffusers import DPMSolverMultistepScheduler, UNet2DModel
        from safetensors.torch import load_file

        folder = Path(model_dir) / FOLDER
        if not (folder / "unet").is_dir():
            raise MedDiffFTError(f"{model_dir} has no mask generator (a model from `meddiffft pretrain` "
                                 "or fine-tuned with --mask-steps 0): fine-tune it on labeled cases with "
                                 "--mask-steps above 0, or pass --mask-source label or jitter.")
        unet = UNet2DModel.from_pretrained(folder / "unet", use_safetensors=True).to(device).eval()
        scheduler = DPMSolverMultistepScheduler.from_pretrained(folder / "scheduler",
                                                                algorithm_type="dpmsolver++")
        shapes = load_file(str(folder / SHAPES_FILE))["shapes"].numpy().astype(bool)
        lesions = json.loads((folder / LESIONS_FILE).read_text())["lesions"]
        return cls(unet, scheduler, shapes, lesions, device)

    @torch.no_grad()
    def sample_shapes(self, count: int, generator: torch.Generator) -> list[np.ndarray]:
        """``count`` new shapes: sampled, thresholded, largest component with holes filled."""
        self.scheduler.set_timesteps(SAMPLING_STEPS)
        size = (count, 1, self.resolution, self.resolution)
        x = torch.randn(size, generator=generator).to(self.device)
        for t in self.scheduler.timesteps:
            x = self.scheduler.step(self.unet(x, t).sample, t, x).prev_sample
        return [largest_component(plane > 0) for plane in x[:, 0].cpu().numpy()]

    def novelty(self, plane: np.ndarray) -> float:
        """The largest IoU of a 2D lesion (recropped to the model frame) with any training shape."""
        shape = canonical_shape(plane, self.resolution)
        inter = (self.shapes & shape).sum(axis=(1, 2))
        union = (self.shapes | shape).sum(axis=(1, 2))
        return float((inter / np.maximum(union, 1)).max())


def body_region(image: np.ndarray) -> np.ndarray:
    """The body/foreground of an image (3D array, optional channel axis): the smoothed grey image
    above the level halfway between its darkest pixels (1st percentile) and its Otsu threshold,
    largest component, holes filled per slice. Halfway keeps dark tissue (shadows, fluid, the
    lower class of a full-frame ultrasound) and drops air and the outside of a scan fan."""
    grey = to_channels(image, 1).astype(np.float32)
    sigma = 0.02 * max(grey.shape[1:])
    smooth = ndimage.gaussian_filter(grey, sigma=(0 if grey.shape[0] == 1 else 1, sigma, sigma))
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.Execute(sitk.GetImageFromArray(smooth))
    darkest = float(np.percentile(smooth, 1))
    body = largest_component(smooth > darkest + 0.5 * (otsu.GetThreshold() - darkest))
    return np.stack([ndimage.binary_fill_holes(plane) for plane in body])


@dataclass
class GeneratorMaskSource:
    """New lesions drawn from the mask generator (see the module docstring), placed inside
    ``allowed_region`` (a mask file on the background's grid, or a segment of the background's
    own label; default: the image's body), anywhere in it (``placement`` uniform) or near the
    relative position of the real lesion whose profile it follows (learned; a kept old lesion or
    another label there pushes it to a free place nearby). Its size is drawn log-uniform over the
    real lesions' range (``lesion_size`` range), or around that real lesion's own size (real: the
    labeled sizes' distribution; on BUSI's keep pairs, range gave new lesions of 0.3 times the
    labeled lesions' median area, real 0.6: a large lesion often finds no room beside the kept
    one). The background's own lesion (``old_lesion``) is healed; or kept, labeled, and kept
    clear of like any other label; or covered: the new lesion is centred on it, 1-2 times its
    area, and joined with it dilated by ``COVER_MARGIN_PX``, so it is painted over as part of the
    new lesion and the image keeps one lesion, with no half-healed remnant under a background
    label (only a given ``allowed_region`` bounds it; on a background without a lesion, cover
    places like keep)."""

    generator: MaskGenerator
    allowed_region: str | None = None
    old_lesion: str = "heal"
    placement: str = "uniform"
    lesion_size: str = "range"
    bounds: GeometryBounds = field(default_factory=GeometryBounds)
    name: str = "generator"
    regions: dict = field(default_factory=dict, repr=False)  # per background image path

    def region(self, background: Case) -> np.ndarray:
        """The allowed region on the background's grid (bool, array order)."""
        if background.image_path not in self.regions:
            self.regions[background.image_path] = self._read_region(background)
        return self.regions[background.image_path]

    def _read_region(self, background: Case) -> np.ndarray:
        spec = self.allowed_region
        if spec is None:
            return body_region(background.image) | background.foreground
        if os.path.isfile(spec):
            return read_case(background.image_path, spec).foreground
        if background.label_path is None:
            raise MedDiffFTError(f"--allowed-region {spec}: a segment needs a labeled image, and "
                                 f"{background.image_path} has no label; give a mask file instead.")
        return read_case(background.image_path, background.label_path, segment=spec).foreground

    def propose(self, label, foreground, axis, rng, background):
        seed = int(rng.integers(2**31))
        draw = np.random.default_rng(seed)
        noise = torch.Generator().manual_seed(seed)
        allowed = slice_stack(self.region(background), axis)
        margin = max(2, round(self.bounds.margin * min(allowed.shape[1:])))
        old = slice_stack(background.foreground, axis)
        cover = self.old_lesion == "cover" and bool(old.any())
        if cover and self.allowed_region is None:  # anchored on the old lesion, whose dark rim or
            allowed = np.ones_like(allowed)  # shadow the body outline often leaves out
        if self.old_lesion == "heal":
            others = slice_stack((label != 0) & ~foreground, axis)
        else:  # keep: every label is an obstacle; cover: every label but the lesion it covers
            others = slice_stack((background.label != 0) & ~(background.foreground & cover), axis)
        if self.allowed_region is not None and not os.path.isfile(self.allowed_region):
            others = others & ~allowed  # the segment the lesion goes into (e.g. the organ) is no obstacle
        forbidden = ~allowed | np.stack([ndimage.distance_transform_edt(~plane) <= margin if plane.any()
                                         else plane for plane in others])
        forbidden[:, :margin], forbidden[:, -margin:] = True, True
        forbidden[:, :, :margin], forbidden[:, :, -margin:] = True, True
        peaks = [max(lesion["areas"]) for lesion in self.generator.lesions]
        if cover:  # around the old lesion, whatever the labeled lesions' range
            old_peak = float(old.reshape(len(old), -1).sum(axis=1).max())
            low, high = (old_peak * growth for growth in COVER_GROWTH)
            voxels = np.argwhere(old)
            target = frame_position((voxels.min(axis=0) + voxels.max(axis=0)) / 2, old.shape).round(4).tolist()
        else:
            low = min(peaks) / self.bounds.area_slack
            high = max(peaks) * self.bounds.area_slack
        candidates: list[np.ndarray] = []
        for _ in range(MAX_TRIES):
            if not candidates:  # whole shapes (not cut by the frame) first
                candidates = [c for c in self.generator.sample_shapes(CANDIDATES, noise) if c.any()]
                candidates.sort(key=lambda c: bool(c[[0, -1]].any() or c[:, [0, -1]].any()))
            if not candidates:
                continue
            shape = candidates.pop(0)
            lesion_index = int(draw.integers(len(self.generator.lesions)))
            if self.lesion_size == "real" and not cover:
                area = float(np.clip(peaks[lesion_index] * np.exp(draw.normal(0.0, REAL_SIZE_SD)), low, high))
            else:
                area = float(np.exp(draw.uniform(np.log(low), np.log(max(low, high)))))
            lesion, geometry = self._sweep(shape, self.generator.lesions[lesion_index], area, draw)
            peak = int(lesion.reshape(len(lesion), -1).sum(axis=1).max()) if lesion.any() else 0
            slack = self.bounds.area_slack if cover else 1.0  # the range's own slack otherwise
            if not low / slack <= peak <= high * slack:
                continue
            novelty = max(self.generator.novelty(plane) for plane in lesion if plane.any())
            if novelty >= NOVELTY_IOU:
                continue
            if not cover:
                target = self._target(lesion_index, draw)
            start = _place(forbidden, lesion, draw, target, COVER_SPREAD if cover else self.bounds.spread)
            if start is None:
                high = max(low, math.sqrt(low * high))  # a smaller lesion may fit
                continue
            new = np.zeros(allowed.shape, dtype=bool)
            new[tuple(slice(s, s + e) for s, e in zip(start, lesion.shape))] = lesion
            if cover:
                new = _cover(new, old)
                peak = int(new.reshape(len(new), -1).sum(axis=1).max())
            new = np.moveaxis(new, 0, axis)
            values, counts = np.unique(label[foreground], return_counts=True)
            value = values[np.argmax(counts)] if len(values) else 1
            if self.old_lesion != "heal":  # the background's own labels, its lesion included
                out_label = background.label.copy()
            else:  # the healed old lesion takes the label around it
                _, nearest = ndimage.distance_transform_edt(foreground, return_indices=True)
                out_label = label[tuple(nearest)]
            out_label[new] = value
            details = {"mask_seed": seed, "area_px": peak, "max_training_iou": round(novelty, 4),
                       "real_lesion": lesion_index, "lesion_slices": len(lesion),
                       "placement": [int(s) for s in start],
                       "allowed_region": self.allowed_region or "body", "placement_mode": self.placement,
                       "lesion_size": self.lesion_size,
                       **({"placement_target": target} if target is not None else {}),
                       "old_lesion": self.old_lesion, **geometry}
            healed = background.foreground.copy() if self.old_lesion == "heal" else np.zeros_like(background.foreground)
            return Proposal(out_label, new, details, healed)
        raise PlacementError(f"The mask generator could not place a new lesion ({low:.0f}-{high:.0f} px) "
                             f"inside the allowed region in {MAX_TRIES} tries: give a larger "
                             "--allowed-region, or use --mask-source jitter.")

    def _target(self, lesion_index: int, draw: np.random.Generator) -> list[float] | None:
        """Where a learned placement aims (relative to the frame), None for a uniform one."""
        if self.placement == "uniform":
            return None
        position = self.generator.lesions[lesion_index].get("position")
        if position is None:
            raise MedDiffFTError("This model's mask generator records no lesion positions (it predates "
                                 "--placement learned): fine-tune it again, or use --placement uniform.")
        return [round(p + float(draw.normal(0.0, self.bounds.spread)), 4) for p in position]

    def _sweep(self, shape: np.ndarray, real: dict, area: float,
               draw: np.random.Generator) -> tuple[np.ndarray, dict]:
        """The shape as a lesion of ``area`` px at its largest slice, swept over as many slices as
        the real lesion ``real`` (scaled by its smoothed area profile, following its centroid
        track), rotated, flipped and warped smoothly. Returns (cropped (n, h, w) stack, geometry)."""
        resolution = shape.shape[0]
        profile = ndimage.gaussian_filter1d(np.asarray(real["areas"], np.float64), 1.0, mode="nearest")
        profile /= profile.max()
        count, peak = len(profile), int(np.argmax(profile))
        zoom = math.sqrt(area / shape.sum())
        angle = float(draw.uniform(-self.bounds.max_rotation, self.bounds.max_rotation))
        flip = bool(draw.random() < 0.5)
        warp = ndimage.gaussian_filter(draw.standard_normal((2, count, resolution, resolution)),
                                       sigma=(0, 2, resolution / 8, resolution / 8))
        warp *= self.bounds.elastic * resolution / (warp.std() + 1e-12)
        theta = math.radians(angle)
        forward = zoom * np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        if flip:
            forward = forward @ np.diag([1.0, -1.0])
        inverse = np.linalg.inv(forward)
        drift = np.asarray(real["centroids"]) - real["centroids"][peak]
        drift = drift * math.sqrt(area / max(real["areas"])) @ (forward / zoom).T
        reach = np.abs(drift).max()
        side = math.ceil(resolution * zoom * 1.5 + 2 * reach) + 2
        centre = (resolution - 1) / 2
        grid = np.mgrid[0:resolution, 0:resolution].astype(np.float64)
        source = shape.astype(np.float32)
        if zoom < 1:  # anti-aliasing before shrinking
            source = ndimage.gaussian_filter(source, 0.5 / zoom)
        planes = []
        for k in range(count):
            scale = math.sqrt(profile[k])
            coords = centre + (grid - centre) / scale + warp[:, k]
            canonical = ndimage.map_coordinates(source, coords, order=1)
            offset = centre - inverse @ ((side - 1) / 2 + drift[k])
            native = ndimage.affine_transform(canonical, inverse, offset=offset, output_shape=(side, side),
                                              order=1)
            planes.append(largest_component(native > 0.5))
        lesion = largest_component(np.stack(planes))
        if lesion.any():
            box = np.argwhere(lesion)
            lesion = lesion[tuple(slice(a, b + 1) for a, b in zip(box.min(axis=0), box.max(axis=0)))]
        return lesion, {"rotation_deg": round(angle, 2), "flip": flip, "zoom": round(zoom, 4)}


def _cover(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """The placed new lesion joined with the old one dilated by ``COVER_MARGIN_PX`` in each slice,
    holes filled, so that the old lesion and its edge lie inside what is painted (slice stacks)."""
    grown = np.stack([ndimage.binary_dilation(plane, iterations=COVER_MARGIN_PX) if plane.any() else plane
                      for plane in old])
    return np.stack([ndimage.binary_fill_holes(plane) for plane in new | grown])


def _place(forbidden: np.ndarray, lesion: np.ndarray, draw: np.random.Generator,
           target: list[float] | None = None, spread: float = GeometryBounds.spread) -> np.ndarray | None:
    """A random start (slice, row, col) where ``lesion`` overlaps no forbidden voxel, or None:
    uniform over the free starts, or with ``target`` (the lesion centre relative to the frame)
    drawn with Gaussian weights of ``spread`` around it (so a free start is always found)."""
    if any(e > s for e, s in zip(lesion.shape, forbidden.shape)):
        return None
    overlap = fftconvolve(forbidden.astype(np.float32), lesion[::-1, ::-1, ::-1].astype(np.float32),
                          mode="valid")
    free = np.argwhere(overlap < 0.5)
    if not len(free):
        return None
    if target is None:
        return free[draw.integers(len(free))]
    centres = frame_position(free + (np.asarray(lesion.shape) - 1) / 2, forbidden.shape)
    axes = [a for a, n in enumerate(forbidden.shape) if n > 1]  # a 2D image has one slice
    score = -0.5 * (((centres[:, axes] - np.asarray(target)[axes]) / spread) ** 2).sum(axis=1)
    weights = np.exp(score - score.max())
    return free[draw.choice(len(free), p=weights / weights.sum())]
