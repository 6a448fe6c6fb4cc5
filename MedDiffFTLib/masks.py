"""Guide-mask sources and mask utilities.

A mask source proposes, for one sample, the new label on the background's grid. ``label`` uses
the case's own label; ``jitter`` moves, scales and rotates it (the same transform on every slice,
so a 3D lesion stays coherent); ``generator`` draws new lesions from the model folder's mask
generator (mask_generator.py). A run builds its source once (``make_mask_source``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
from scipy import ndimage

from .errors import MedDiffFTError, PlacementError

if TYPE_CHECKING:
    import torch

    from .caseio import Case


def dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """Binary dilation of a 2D mask by a Euclidean radius in pixels."""
    if radius <= 0:
        return mask.astype(bool)
    return ndimage.distance_transform_edt(~mask.astype(bool)) <= radius


def random_blob(shape: tuple[int, int], rng: np.random.Generator, *, min_radius: float = 0.08,
                max_radius: float = 0.3, centre: tuple[float, float] | None = None) -> np.ndarray:
    """An irregular, connected, hole-free blob: a thresholded smooth random field inside a random
    ellipse (the mask curriculum's "random blobs")."""
    height, width = shape
    side = min(height, width)
    ry, rx = rng.uniform(min_radius, max_radius, size=2) * side
    cy, cx = centre if centre is not None else (rng.uniform(ry, height - ry), rng.uniform(rx, width - rx))
    angle = rng.uniform(0, math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    u = (dx * math.cos(angle) + dy * math.sin(angle)) / max(rx, 1.0)
    v = (-dx * math.sin(angle) + dy * math.cos(angle)) / max(ry, 1.0)
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=side / 16)
    field /= field.std() + 1e-8
    blob = (u * u + v * v) < 1.0 + 0.35 * field
    if not blob.any():
        blob = (u * u + v * v) < 1.0
    return largest_component(blob)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component, holes filled."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask.astype(bool)
    sizes = ndimage.sum(mask, labels, index=range(1, count + 1))
    return ndimage.binary_fill_holes(labels == (int(np.argmax(sizes)) + 1))


@dataclass(frozen=True)
class Proposal:
    """A new label for one sample: ``label`` holds label values on the background grid,
    ``foreground`` the lesion to paint, ``healed`` the background's own lesion to paint over as
    tissue (the label no longer marks it); ``details`` are recorded in the manifest."""

    label: np.ndarray
    foreground: np.ndarray
    details: dict
    healed: np.ndarray


class MaskSource(Protocol):
    """Proposes the new lesion for a sample from the case's label placed on the ``background``
    case's grid, slicing along ``axis``; all randomness comes from ``rng``."""

    name: str

    def propose(self, label: np.ndarray, foreground: np.ndarray, axis: int,
                rng: np.random.Generator, background: "Case") -> Proposal: ...


class LabelMaskSource:
    """The case's own label: variants that keep the lesion's shape and place."""

    name = "label"

    def propose(self, label, foreground, axis, rng, background):
        return Proposal(label.copy(), foreground.copy(), {}, background.foreground.copy())


@dataclass
class JitterMaskSource:
    """The case's label moved, scaled and rotated in-plane (one transform for all slices), kept
    inside the slice. Bounds: translation as a fraction of the slice size, scale factor range,
    rotation in degrees."""

    max_shift: float = 0.15
    scale_range: tuple[float, float] = (0.8, 1.25)
    max_rotation: float = 30.0
    name: str = "jitter"

    def propose(self, label, foreground, axis, rng, background):
        stack_label = np.moveaxis(label, axis, 0)
        stack_fg = np.moveaxis(foreground, axis, 0)
        height, width = stack_fg.shape[1:]
        occupied = stack_fg.any(axis=0)
        y0, x0 = np.argwhere(occupied).min(axis=0)
        y1, x1 = np.argwhere(occupied).max(axis=0) + 1
        for _ in range(20):
            scale = float(np.exp(rng.uniform(*np.log(self.scale_range))))
            angle = float(rng.uniform(-self.max_rotation, self.max_rotation))
            shift = rng.uniform(-self.max_shift, self.max_shift, size=2) * (height, width)
            new_label = self._transform(stack_label, foreground_only=stack_fg, scale=scale,
                                        angle=angle, shift=shift, centre=((y0 + y1) / 2, (x0 + x1) / 2))
            new_fg = self._transform(stack_fg.astype(np.uint8), foreground_only=stack_fg, scale=scale,
                                     angle=angle, shift=shift, centre=((y0 + y1) / 2, (x0 + x1) / 2)) > 0
            border = np.zeros((height, width), bool)
            border[[0, -1], :] = True
            border[:, [0, -1]] = True
            if new_fg.any() and not (new_fg & border).any():
                break
        else:
            raise PlacementError("--jitter could not place the lesion inside the image in 20 tries; "
                                 "lower the jitter bounds or use --mask-source label.")
        out_label = np.where(stack_fg, 0, stack_label).astype(label.dtype)
        out_label[new_fg] = new_label[new_fg]
        details = {"scale": scale, "rotation_deg": angle, "shift_px": [float(s) for s in shift]}
        return Proposal(np.moveaxis(out_label, 0, axis).copy(), np.moveaxis(new_fg, 0, axis).copy(),
                        details, background.foreground.copy())

    @staticmethod
    def _transform(stack: np.ndarray, *, foreground_only: np.ndarray, scale: float, angle: float,
                   shift: np.ndarray, centre: tuple[float, float]) -> np.ndarray:
        """Nearest-neighbour in-plane similarity transform of each slice's lesion voxels."""
        theta = math.radians(angle)
        rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        matrix = rotation / scale  # output -> input coordinates
        c = np.asarray(centre)
        offset = c - matrix @ (c + shift)
        values = np.where(foreground_only, stack, 0)
        return np.stack([ndimage.affine_transform(plane, matrix, offset=offset, order=0, mode="constant")
                         for plane in values])


def place_label(label: np.ndarray, foreground: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Move a label onto a grid of another ``shape`` (a background), keeping the lesion's relative
    position; the lesion's bounding box must fit (else only this sample is rejected)."""
    if label.shape == tuple(shape):
        return label.copy(), foreground.copy()
    boxes = np.argwhere(foreground)
    low, high = boxes.min(axis=0), boxes.max(axis=0) + 1
    extent = high - low
    if any(e > s for e, s in zip(extent, shape)):
        raise PlacementError(f"The case's lesion ({tuple(int(e) for e in extent)} voxels) does not fit "
                             f"in the background ({tuple(shape)}): this sample is skipped; use larger "
                             "backgrounds to use them all.")
    centre = (low + high) / 2 / np.asarray(label.shape) * np.asarray(shape)
    start = np.clip(np.round(centre - extent / 2).astype(int), 0, np.asarray(shape) - extent)
    out_label = np.zeros(shape, dtype=label.dtype)
    out_fg = np.zeros(shape, dtype=bool)
    src = tuple(slice(a, b) for a, b in zip(low, high))
    dst = tuple(slice(a, a + e) for a, e in zip(start, extent))
    out_fg[dst] = foreground[src]
    out_label[dst] = np.where(foreground[src], label[src], 0)
    return out_label, out_fg


MASK_SOURCES = ("label", "jitter", "generator")
OLD_LESION = ("heal", "keep", "cover")
PLACEMENTS = ("uniform", "learned")
LESION_SIZES = ("range", "real")


def check_mask_source(name: str, *, allowed_region: str | None = None, old_lesion: str = "heal",
                      placement: str = "uniform", lesion_size: str = "range") -> None:
    """Reject mask-source options that do not go together (before any training is spent)."""
    if name not in MASK_SOURCES:
        raise MedDiffFTError(f"--mask-source {name}: choose one of {', '.join(MASK_SOURCES)}.")
    if old_lesion not in OLD_LESION:
        raise MedDiffFTError(f"--old-lesion {old_lesion}: choose one of {', '.join(OLD_LESION)}.")
    if placement not in PLACEMENTS:
        raise MedDiffFTError(f"--placement {placement}: choose one of {', '.join(PLACEMENTS)}.")
    if lesion_size not in LESION_SIZES:
        raise MedDiffFTError(f"--lesion-size {lesion_size}: choose one of {', '.join(LESION_SIZES)}.")
    if lesion_size != "range" and name != "generator":
        raise MedDiffFTError(f"--lesion-size {lesion_size} sizes generated lesions (--mask-source generator); "
                             f"--mask-source {name} keeps the case's own lesion size: drop --lesion-size.")
    if placement != "uniform" and name != "generator":
        raise MedDiffFTError(f"--placement {placement} places generated lesions (--mask-source generator); "
                             f"--mask-source {name} works from the case's own lesion: drop --placement.")
    if allowed_region is not None and name != "generator":
        raise MedDiffFTError(f"--allowed-region places generated lesions (--mask-source generator); "
                             f"with --mask-source {name} drop it.")
    if old_lesion != "heal" and name != "generator":
        raise MedDiffFTError(f"--old-lesion {old_lesion} places a generated lesion by the old one "
                             f"(--mask-source generator); --mask-source {name} repaints the old lesion "
                             "itself: drop --old-lesion or use --mask-source generator.")
    if old_lesion == "cover" and (placement != "uniform" or lesion_size != "range"):
        raise MedDiffFTError("--old-lesion cover places and sizes the new lesion by the old one it covers: "
                             "drop --placement and --lesion-size.")


def make_mask_source(name: str, *, model_dir: str | os.PathLike | None = None,
                     allowed_region: str | None = None, old_lesion: str = "heal",
                     placement: str = "uniform", lesion_size: str = "range",
                     device: "torch.device | None" = None) -> MaskSource:
    """The run's mask source; ``generator`` loads the mask model from ``model_dir`` once.
    ``old_lesion`` keep: a generated lesion is added next to the background's own lesion, which
    stays real and labeled (heal: it is painted over as tissue; cover: the new lesion is painted
    over it). ``placement`` learned: near a labeled lesion's relative position (uniform: anywhere in
    the allowed region). ``lesion_size`` real: about the size of a labeled lesion (range: anywhere
    in the labeled lesions' size range, log-uniform)."""
    check_mask_source(name, allowed_region=allowed_region, old_lesion=old_lesion, placement=placement,
                      lesion_size=lesion_size)
    if name == "label":
        return LabelMaskSource()
    if name == "jitter":
        return JitterMaskSource()
    import torch

    from .mask_generator import GeneratorMaskSource, MaskGenerator

    if model_dir is None:
        raise MedDiffFTError("--mask-source generator needs the model folder: build the source with "
                             "make_mask_source('generator', model_dir=...) and pass it to generate_samples.")
    generator = MaskGenerator.load(model_dir, device or torch.device("cpu"))
    return GeneratorMaskSource(generator, allowed_region, old_lesion=old_lesion, placement=placement,
                               lesion_size=lesion_size)
