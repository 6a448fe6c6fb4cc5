"""Slices: the slicing axis, per-case intensity normalization with an exact inverse, and square
windows that carry a slice region to the working resolution and back.

ROI mode keeps texture: the window around a lesion is taken at native resolution and resampled
only when it is larger than the working resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import MedDiffFTError


def choose_axis(spacing: tuple[float, float, float], axis: str | int, is_2d: bool) -> int:
    """Array axis to slice along: ``auto`` = the axis of largest spacing (ties: axis 0, axial)."""
    if is_2d:
        return 0
    if str(axis) == "auto":
        largest = max(spacing)
        return next(i for i, s in enumerate(spacing) if math.isclose(s, largest, rel_tol=1e-6))
    value = int(axis)
    if value not in (0, 1, 2):
        raise MedDiffFTError(f"--axis {axis}: use auto, 0, 1 or 2 (array axes in Z, Y, X order).")
    return value


def to_channels(image: np.ndarray, channels: int, spatial_dims: int = 3) -> np.ndarray:
    """View an image with the model's channel count: colour -> grey (channel mean) for a grey
    model, grey -> replicated for a colour model. Scalar arrays have ``spatial_dims`` dims."""
    has_channels = image.ndim > spatial_dims
    if channels == 1:
        return image.mean(axis=-1) if has_channels else image
    return image if has_channels else np.repeat(image[..., None], channels, axis=-1)


def slice_stack(array: np.ndarray, axis: int) -> np.ndarray:
    """A view with the slicing axis first: ``stack[i]`` is slice i, writable into ``array``."""
    return np.moveaxis(array, axis, 0)


@dataclass(frozen=True)
class IntensityMap:
    """Linear map of intensities ``[low, high]`` onto ``[-1, 1]``; ``inverse`` undoes it exactly
    (up to the input's pixel type), values outside ``[low, high]`` are clipped."""

    low: float
    high: float

    def forward(self, values: np.ndarray) -> np.ndarray:
        scaled = (np.asarray(values, dtype=np.float64) - self.low) / (self.high - self.low)
        return np.clip(scaled * 2.0 - 1.0, -1.0, 1.0).astype(np.float32)

    def inverse(self, values: np.ndarray) -> np.ndarray:
        return (np.asarray(values, dtype=np.float64) + 1.0) / 2.0 * (self.high - self.low) + self.low


def fit_intensity(image: np.ndarray, spec: str) -> IntensityMap:
    """Per-case normalization: ``auto`` (8-bit data: 0..255; else ``percentile``),
    ``percentile`` (0.5 and 99.5 percentiles) or ``window:C,W`` (centre and width)."""
    if spec == "auto":
        if image.dtype == np.uint8:
            return IntensityMap(0.0, 255.0)
        spec = "percentile"
    if spec == "percentile":
        low, high = np.percentile(image, [0.5, 99.5])
        if high <= low:
            low, high = float(image.min()), float(image.max())
        if high <= low:
            high = low + 1.0
        return IntensityMap(float(low), float(high))
    if spec.startswith("window:"):
        try:
            centre, width = (float(v) for v in spec[len("window:"):].split(","))
        except ValueError:
            raise MedDiffFTError(f"--intensity {spec}: write window:CENTRE,WIDTH, e.g. window:40,400.") \
                from None
        if width <= 0:
            raise MedDiffFTError(f"--intensity {spec}: the window width must be positive.")
        return IntensityMap(centre - width / 2.0, centre + width / 2.0)
    raise MedDiffFTError(f"--intensity {spec}: use auto, percentile or window:CENTRE,WIDTH.")


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the non-zero pixels, end-exclusive."""
    ys, xs = np.nonzero(mask)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


@dataclass(frozen=True)
class Window:
    """A square ``size`` x ``size`` window of a slice at (y0, x0), possibly reaching past the
    slice border (padded by reflection), carried to ``resolution`` x ``resolution``."""

    y0: int
    x0: int
    size: int
    resolution: int

    @property
    def native(self) -> bool:
        """True when no resampling happens (ROI at native resolution)."""
        return self.size == self.resolution

    def _pad_crop(self, plane: np.ndarray) -> np.ndarray:
        height, width = plane.shape[:2]
        pad_top, pad_left = max(0, -self.y0), max(0, -self.x0)
        pad_bottom = max(0, self.y0 + self.size - height)
        pad_right = max(0, self.x0 + self.size - width)
        pads = [(pad_top, pad_bottom), (pad_left, pad_right)] + [(0, 0)] * (plane.ndim - 2)
        mode = "reflect" if min(height, width) > max(pads[0] + pads[1]) else "edge"
        padded = np.pad(plane, pads, mode=mode) if any(sum(p) for p in pads) else plane
        y, x = self.y0 + pad_top, self.x0 + pad_left
        return padded[y:y + self.size, x:x + self.size]

    def extract(self, plane: np.ndarray, *, is_mask: bool = False) -> torch.Tensor:
        """Window of a (H, W[, C]) plane as a (C, R, R) float tensor (masks: max-pooled, so
        small lesions survive downsampling)."""
        crop = self._pad_crop(plane)
        tensor = torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))
        tensor = tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor[None]
        if self.native:
            return tensor
        if is_mask:
            if self.size > self.resolution:
                soft = F.interpolate(tensor[None], size=(self.resolution,) * 2, mode="area")[0]
                return (soft > 0).float()
            return F.interpolate(tensor[None], size=(self.resolution,) * 2, mode="nearest")[0]
        return F.interpolate(tensor[None], size=(self.resolution,) * 2, mode="bilinear",
                             antialias=True, align_corners=False)[0]

    def to_native(self, tensor: torch.Tensor) -> np.ndarray:
        """(C, R, R) model-space tensor back to a (size, size[, C]) native array."""
        if not self.native:
            tensor = F.interpolate(tensor[None].float(), size=(self.size,) * 2, mode="bilinear",
                                   align_corners=False)[0]
        array = tensor.cpu().numpy()
        return array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)

    def slice_bounds(self, shape: tuple[int, int]) -> tuple[slice, slice, slice, slice]:
        """(plane rows, plane cols, window rows, window cols) of the overlap with a plane."""
        height, width = shape
        y0, y1 = max(0, self.y0), min(height, self.y0 + self.size)
        x0, x1 = max(0, self.x0), min(width, self.x0 + self.size)
        return (slice(y0, y1), slice(x0, x1),
                slice(y0 - self.y0, y1 - self.y0), slice(x0 - self.x0, x1 - self.x0))


def context_indices(index: int, count: int, context_slices: int) -> list[int | None]:
    """The slices that give slice ``index`` of a stack of ``count`` its context (``--context-slices
    N``): the N below, then the N above, each clamped to the stack (the edge slice is replicated);
    None where that would be the slice itself (at the stack's two edge slices, and always for a 2D
    image, a stack of one): those context planes are zeros, so the model never sees the slice it
    paints unmasked."""
    offsets = [*range(-context_slices, 0), *range(1, context_slices + 1)]
    picks = [min(max(index + offset, 0), count - 1) for offset in offsets]
    return [None if pick == index else pick for pick in picks]


def extract_context(window: Window, stack: np.ndarray, index: int, context_slices: int) -> torch.Tensor:
    """Context channels (2 N C, R, R) of slice ``index`` of ``stack`` (S, H, W[, C]) in ``window``
    (see ``context_indices``); (0, R, R) when N = 0."""
    channels = stack.shape[3] if stack.ndim == 4 else 1
    planes = [window.extract(stack[pick]) if pick is not None
              else torch.zeros((channels, window.resolution, window.resolution))
              for pick in context_indices(index, len(stack), context_slices)]
    return torch.cat(planes) if planes else torch.zeros((0, window.resolution, window.resolution))


NATIVE_LIMIT = 4  # native windows wider than this x resolution are downsampled to it


def _round_up(value: int, multiple: int = 8) -> int:
    return -(-value // multiple) * multiple


def window_around(mask: np.ndarray, resolution: int, *, roi: str = "auto", context: float = 0.5,
                  shift: tuple[float, float] = (0.0, 0.0), scale: str = "native") -> Window:
    """The window for a lesion: its bounding box plus ``context`` x its size on each side, at
    least ``resolution`` wide, or the whole slice (``roi=off``, or ``auto`` when the lesion window
    would cover the slice anyway). ``shift`` moves the centre by a fraction of the window (training
    augmentation).

    ``scale="fit"`` carries the window to ``resolution`` px (native when it is that small);
    ``scale="native"`` keeps its native pixels (up to ``NATIVE_LIMIT`` x ``resolution``): the
    fully convolutional model, trained on ``resolution``-px crops, paints at the tissue's own
    sharpness.
    """
    if roi not in ("on", "off", "auto"):
        raise MedDiffFTError(f"--roi {roi}: use auto, on or off.")
    if scale not in ("fit", "native"):
        raise MedDiffFTError(f"--scale {scale}: use fit or native.")
    height, width = mask.shape
    whole = max(height, width)
    y0, y1, x0, x1 = bounding_box(mask)
    side = max(y1 - y0, x1 - x0)
    size = max(resolution, int(math.ceil(side * (1 + 2 * context))))
    if scale == "native":
        size, whole = _round_up(size), _round_up(whole)
    output = resolution if scale == "fit" else min(size, NATIVE_LIMIT * resolution)
    if roi == "off" or size >= whole:
        side = whole if scale == "fit" else max(whole, resolution)  # native: never below the model size
        output = resolution if scale == "fit" else min(side, NATIVE_LIMIT * resolution)
        return Window((height - side) // 2, (width - side) // 2, side, output)
    cy = (y0 + y1) / 2 + shift[0] * size
    cx = (x0 + x1) / 2 + shift[1] * size

    def place(centre: float, extent: int) -> int:
        start = int(round(centre - size / 2))
        return min(max(start, 0), extent - size) if extent >= size else (extent - size) // 2

    return Window(place(cy, height), place(cx, width), size, output)
