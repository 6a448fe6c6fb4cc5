"""A small fixed MONAI 2D U-Net segmenter for slices: the downstream model of ``evaluate`` and the
judge of mask faithfulness in quality assessment.

Training is deterministic for a seed (model init, batch order and augmentation all derive from
``SegmenterSettings.seed``), uses nnU-Net-like augmentation (and, if asked, nnU-Net's polynomial
learning-rate decay), mixes synthetic pairs into every batch at a fixed share (or, as a curriculum,
only into the first steps), and keeps the best-validation weights.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import MedDiffFTError
from .progress import Progress

AUGMENTATIONS = ("strong", "none")
LR_SCHEDULES = ("constant", "poly")  # poly: nnU-Net's lr x (1 - step / max_steps) ** 0.9
# Raised whenever `augment` draws differently, so evaluate does not reuse segmenters trained with
# another recipe (1: MONAI's per-sample transforms; 2: `augment`, batched).
AUGMENTATION_RECIPE = 2


@dataclass
class SegmenterSettings:
    resolution: int = 128         # square model input side in px
    max_steps: int = 3000         # optimizer steps at most
    batch_size: int = 8
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"  # "constant" | "poly" (decays to 0 over max_steps, as nnU-Net)
    augmentation: str = "strong"  # "strong" (nnU-Net-like) | "none"
    validate_every: int = 100
    patience: int = 0             # validations without improvement before stopping early (0 = never)
    synthetic_fraction: float = 0.5  # share of each batch drawn from synthetic pairs when given
    synthetic_until: float = 1.0  # share of the steps, the first ones, that mix synthetic pairs in; the
    #                               rest are real only (< 1: a synthetic-first curriculum)
    seed: int = 0


def planes_to_tensor(planes: Sequence[np.ndarray], resolution: int, *, is_mask: bool = False) -> torch.Tensor:
    """(N, 1, R, R) float32. Images: grey (mean over a trailing colour axis), each plane normalized to
    [0, 1] (0.5/99.5 percentiles), resized to R x R; masks: binary {0, 1} (area-resized, > 0.5)."""
    out = []
    for plane in planes:
        plane = np.asarray(plane, dtype=np.float32)
        if is_mask:
            plane = (plane > 0).astype(np.float32)
        else:
            if plane.ndim == 3:
                plane = plane.mean(axis=-1)
            low, high = np.percentile(plane, [0.5, 99.5])
            plane = np.clip((plane - low) / max(float(high - low), 1e-6), 0.0, 1.0).astype(np.float32)
        if plane.ndim != 2:
            raise MedDiffFTError(f"A slice has shape {plane.shape}; the segmenter takes 2D planes "
                                 "(H, W) or colour planes (H, W, C).")
        resized = F.interpolate(torch.from_numpy(np.ascontiguousarray(plane))[None, None],
                                size=(resolution, resolution), mode="area")[0]
        out.append((resized > 0.5).float() if is_mask else resized)
    if not out:
        return torch.zeros((0, 1, resolution, resolution))
    return torch.stack(out)


def build_model() -> torch.nn.Module:
    """The fixed architecture (same in every arm and every caller)."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(16, 32, 64, 128),
                strides=(2, 2, 2), num_res_units=1, norm="batch")


# nnU-Net-like 2D augmentation (nnU-Net's probabilities; the ranges of the MONAI transforms used here
# before, plus a mild elastic field), drawn for a whole batch at once: MONAI's transforms take one
# sample per call, which made augmentation 43 % of a CPU training step
# (bench/segmenter_augmentation.py --step-times).
ROTATION_P, ROTATION = 0.2, math.pi          # angle ~ U(-pi, pi)
SCALING_P, SCALING = 0.2, 0.3                # each axis' scale ~ 1 + U(-0.3, 0.3)
ELASTIC_P, ELASTIC_SPACING, ELASTIC_PX = 0.2, 16, (0.5, 1.5)  # control-point offsets ~ N(0, 1) x U(0.5, 1.5) px
NOISE_P, NOISE_SD = 0.1, 0.1                 # noise sd ~ U(0, 0.1)
SMOOTH_P, SMOOTH_SIGMA = 0.2, (0.5, 1.0)     # Gaussian sigma per axis, px
BRIGHTNESS_P, BRIGHTNESS = 0.15, 0.25        # image x (1 + U(-0.25, 0.25))
GAMMA_P, GAMMA = 0.3, (0.7, 1.5)             # gamma on the image's own [min, max]
FLIP_P = 0.5                                 # each axis


def _uniform(generator: torch.Generator, count: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(count, generator=generator)


def _chosen(generator: torch.Generator, count: int, probability: float) -> torch.Tensor:
    return torch.rand(count, generator=generator) < probability


def _spatial_grid(count: int, resolution: int, generator: torch.Generator) -> torch.Tensor:
    """(N, R, R, 2) sampling grid for ``F.grid_sample``: rotation, per-axis scaling and an elastic
    field (coarse random offsets, bicubic-upsampled), each applied to its own random share."""
    angle = torch.where(_chosen(generator, count, ROTATION_P), _uniform(generator, count, -ROTATION, ROTATION), 0.0)
    scale = torch.where(_chosen(generator, count, SCALING_P)[:, None],
                        1.0 + (torch.rand(count, 2, generator=generator) * 2 - 1) * SCALING, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * scale[:, 0], -sin * scale[:, 1], torch.zeros(count)], 1),
                         torch.stack([sin * scale[:, 0], cos * scale[:, 1], torch.zeros(count)], 1)], 1)
    grid = F.affine_grid(theta, [count, 1, resolution, resolution], align_corners=False)
    points = math.ceil(resolution / ELASTIC_SPACING) + 1
    magnitude = torch.where(_chosen(generator, count, ELASTIC_P), _uniform(generator, count, *ELASTIC_PX), 0.0)
    offsets = torch.randn(count, 2, points, points, generator=generator) * magnitude[:, None, None, None]
    field = F.interpolate(offsets, size=(resolution, resolution), mode="bicubic", align_corners=True)
    return grid + field.permute(0, 2, 3, 1) * (2.0 / resolution)  # px -> normalized coordinates


def _smooth(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each image blurred with its own (sigma_y, sigma_x), zero padding (as MONAI's GaussianFilter)."""
    count = len(images)
    radius = math.ceil(4 * SMOOTH_SIGMA[1])
    taps = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernels = torch.exp(-0.5 * (taps / sigma[..., None]) ** 2)
    kernels = kernels / kernels.sum(-1, keepdim=True)                      # (N, 2, taps)
    planes = images.reshape(1, count, *images.shape[-2:])
    planes = F.conv2d(planes, kernels[:, 0, None, :, None], padding=(radius, 0), groups=count)
    planes = F.conv2d(planes, kernels[:, 1, None, None, :], padding=(0, radius), groups=count)
    return planes.reshape(images.shape)


def augment(images: torch.Tensor, masks: torch.Tensor,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """nnU-Net-like augmentation of a batch (N, 1, R, R) on the batch's device; the random draws
    come from ``generator`` (CPU), so a seed gives the same batch on any device. One resampling
    for all spatial changes (bilinear image, nearest mask, zero padding)."""
    count, device = len(images), images.device
    grid = _spatial_grid(count, images.shape[-1], generator).to(device)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    masks = F.grid_sample(masks, grid, mode="nearest", padding_mode="zeros", align_corners=False)

    def per_image(values: torch.Tensor) -> torch.Tensor:
        return values.to(device)[:, None, None, None]

    noise_sd = torch.where(_chosen(generator, count, NOISE_P), _uniform(generator, count, 0.0, NOISE_SD), 0.0)
    images = images + torch.randn(images.shape, generator=generator).to(device) * per_image(noise_sd)
    smooth = _chosen(generator, count, SMOOTH_P)
    sigma = _uniform(generator, 2 * count, *SMOOTH_SIGMA).reshape(count, 2)
    images = torch.where(per_image(smooth), _smooth(images, sigma.to(device)), images)
    brightness = torch.where(_chosen(generator, count, BRIGHTNESS_P),
                             _uniform(generator, count, -BRIGHTNESS, BRIGHTNESS), 0.0)
    images = images * (1.0 + per_image(brightness))
    gamma = torch.where(_chosen(generator, count, GAMMA_P), _uniform(generator, count, *GAMMA), 1.0)
    low = images.amin((1, 2, 3), keepdim=True)
    span = images.amax((1, 2, 3), keepdim=True) - low
    adjusted = ((images - low) / (span + 1e-7)).clamp_min(0.0) ** per_image(gamma) * span + low
    images = torch.where(per_image(gamma != 1.0), adjusted, images)
    for axis in (2, 3):
        flip = per_image(_chosen(generator, count, FLIP_P))
        images = torch.where(flip, images.flip(axis), images)
        masks = torch.where(flip, masks.flip(axis), masks)
    return images, masks


# how a caller's user knows each checked setting (`evaluate` passes its CLI flags)
SETTING_NAMES = {"synthetic_fraction": "The synthetic fraction", "synthetic_until": "The synthetic share of the steps",
                 "lr_schedule": "segmenter learning-rate schedule", "augmentation": "segmenter augmentation"}


def check_settings(settings: SegmenterSettings, names: dict[str, str] = SETTING_NAMES) -> None:
    """Refuse a setting out of its range before any work, naming it as ``names`` says."""
    if not 0.0 <= settings.synthetic_fraction < 1.0:
        raise MedDiffFTError(f"{names['synthetic_fraction']} must be in [0, 1); got {settings.synthetic_fraction}.")
    if not 0.0 <= settings.synthetic_until <= 1.0:
        raise MedDiffFTError(f"{names['synthetic_until']} must be in [0, 1]; got {settings.synthetic_until}.")
    for name, allowed in (("lr_schedule", LR_SCHEDULES), ("augmentation", AUGMENTATIONS)):
        if getattr(settings, name) not in allowed:
            raise MedDiffFTError(f"Unknown {names[name]} {getattr(settings, name)!r}; use one of {', '.join(allowed)}.")


def batch_shares(settings: SegmenterSettings) -> tuple[int, int]:
    """(real, synthetic) pairs in each batch when synthetic pairs are mixed in."""
    synthetic = round(settings.batch_size * settings.synthetic_fraction)
    if synthetic >= settings.batch_size:
        raise MedDiffFTError(f"A synthetic fraction of {settings.synthetic_fraction} leaves no real pair in a "
                             f"batch of {settings.batch_size}; lower the fraction or raise the batch size.")
    return settings.batch_size - synthetic, synthetic


def _check_pairs(images: torch.Tensor, masks: torch.Tensor, what: str) -> None:
    if images.ndim != 4 or images.shape != masks.shape or images.shape[1] != 1:
        raise MedDiffFTError(f"The segmenter's {what} images and masks must both be (N, 1, R, R) "
                             f"(from planes_to_tensor); got {tuple(images.shape)} and {tuple(masks.shape)}.")


def train_segmenter(images: torch.Tensor, masks: torch.Tensor, settings: SegmenterSettings, *,
                    device: torch.device, validation: tuple[torch.Tensor, torch.Tensor] | None = None,
                    synthetic: tuple[torch.Tensor, torch.Tensor] | None = None,
                    progress: Progress | None = None) -> tuple[torch.nn.Module, dict]:
    """Deterministic for a seed. Returns (model in eval mode, history) with history =
    {"loss": [...], "val_dice": [[step, dice], ...], "best_step": int | None}; with ``validation`` the
    best-validation weights are returned."""
    from monai.losses import DiceCELoss

    _check_pairs(images, masks, "training")
    if len(images) == 0:
        raise MedDiffFTError("The segmenter needs at least one training slice.")
    if synthetic is not None:
        _check_pairs(*synthetic, "synthetic")
        if len(synthetic[0]) == 0:
            synthetic = None
    if validation is not None:
        _check_pairs(*validation, "validation")
    check_settings(settings)
    generator = torch.Generator().manual_seed(settings.seed)
    real_per_batch, synthetic_per_batch = (batch_shares(settings) if synthetic is not None
                                           else (settings.batch_size, 0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = build_model().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate, weight_decay=1e-5)
    power = 0.9 if settings.lr_schedule == "poly" else 0.0  # power 0: the rate stays constant
    schedule = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=settings.max_steps, power=power)
    loss_fn = DiceCELoss(sigmoid=True)
    history: dict = {"loss": [], "val_dice": [], "best_step": None}
    best_dice, best_state, stale = -1.0, None, 0

    def draw(pool: tuple[torch.Tensor, torch.Tensor], count: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(len(pool[0]), (count,), generator=generator)
        return pool[0][index], pool[1][index]

    total = settings.max_steps
    mixed_steps = math.ceil(total * settings.synthetic_until) if synthetic_per_batch else 0
    stage = progress.stage("train segmenter", total) if progress is not None else nullcontext(lambda n=1: None)
    with stage as advance:
        for step in range(1, total + 1):
            mixing = step <= mixed_steps
            batch_images, batch_masks = draw((images, masks), real_per_batch if mixing else settings.batch_size)
            if mixing:
                extra_images, extra_masks = draw(synthetic, synthetic_per_batch)
                batch_images = torch.cat([batch_images, extra_images])
                batch_masks = torch.cat([batch_masks, extra_masks])
            batch_images, batch_masks = batch_images.to(device), batch_masks.to(device)
            if settings.augmentation == "strong":
                batch_images, batch_masks = augment(batch_images, batch_masks, generator)
            model.train()
            optimizer.zero_grad()
            loss = loss_fn(model(batch_images), batch_masks)
            loss.backward()
            optimizer.step()
            schedule.step()
            history["loss"].append(float(loss.item()))
            advance(1)
            if validation is not None and (step % settings.validate_every == 0 or step == total):
                dice = float(dice_per_image(predict(model, validation[0]), validation[1]).mean())
                history["val_dice"].append([step, dice])
                if dice > best_dice:
                    best_dice, stale, history["best_step"] = dice, 0, step
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    stale += 1
                    if settings.patience and stale >= settings.patience:
                        advance(total - step)
                        break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), history


ENCODER_BLOCKS = ("model.0", "model.1.submodule.0", "model.1.submodule.1.submodule.0",
                  "model.1.submodule.1.submodule.1.submodule")


@torch.no_grad()
def encoder_features(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """(N, 240): each encoder block's activations averaged inside the (resized) mask, a weight-free
    feature space (the segmenter is trained here) for realism metrics such as KID."""
    modules = dict(model.named_modules())
    outputs: list[torch.Tensor] = []
    hooks = [modules[name].register_forward_hook(lambda _m, _i, out: outputs.append(out))
             for name in ENCODER_BLOCKS]
    try:
        predict(model, images, batch_size=len(images) or 1)
    finally:
        for hook in hooks:
            hook.remove()
    pooled = []
    for activation in outputs:
        region = F.interpolate(masks.float(), size=activation.shape[-2:], mode="area").to(activation.device)
        pooled.append((activation * region).sum((2, 3)) / region.sum((2, 3)).clamp_min(1e-6))
    return torch.cat(pooled, dim=1).cpu().numpy().astype(np.float64)


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, *, batch_size: int = 32) -> torch.Tensor:
    """(N, 1, R, R) bool: the segmenter's foreground (sigmoid > 0.5)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = [model(images[i:i + batch_size].to(device)).cpu() > 0 for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(images.shape, dtype=torch.bool)


def dice_per_image(prediction: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """Dice of each image (N, 1, R, R); both empty -> 1.0, only one empty -> 0.0 (MONAI's DiceMetric
    with ``ignore_empty=False``)."""
    from monai.metrics import compute_dice

    dice = compute_dice(prediction.float(), target.float(), include_background=True, ignore_empty=False)
    return dice.reshape(-1).numpy().astype(np.float64)


def hd95_per_image(prediction: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """95th-percentile Hausdorff distance in model pixels per image; NaN where either side is empty
    (undefined)."""
    from monai.metrics import compute_hausdorff_distance

    out = np.full(len(prediction), np.nan)
    for i, (pred, truth) in enumerate(zip(prediction, target)):
        if pred.any() and truth.any():
            out[i] = float(compute_hausdorff_distance(pred[None].float(), truth[None].float(),
                                                      include_background=True, percentile=95).item())
    return out
