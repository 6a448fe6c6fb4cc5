"""Mask corrosion: the output label is the guide mask eroded in-plane, slice by slice.

Why: the painted lesion's rim is blended into the surrounding tissue, so the guide mask's outer ring
is often not lesion-looking; a label that claims it teaches a segmenter too-large boundaries. The
kernel scales with each lesion slice's size and never erodes a lesion to nothing.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .errors import MedDiffFTError
from .slicing import slice_stack

# auto radius: this fraction of a lesion slice's equivalent-circle radius, rounded (so lesions under
# ~10 px radius, where one px is a fifth of the lesion or more, are not eroded)
AUTO_FRACTION = 0.05


def parse_erode(spec: str) -> str | int:
    """``auto``, or a radius in px (``0`` = no erosion)."""
    if str(spec) == "auto":
        return "auto"
    try:
        radius = int(spec)
    except ValueError:
        raise MedDiffFTError(f"--erode {spec}: use auto, 0 (no erosion) or a radius in px.") from None
    if radius < 0:
        raise MedDiffFTError(f"--erode {spec}: the radius must be 0 or more px.")
    return radius


def _erode(component: np.ndarray, radius: int) -> np.ndarray:
    """Erosion by a disc of ``radius`` px (pixels on the image border count as inside)."""
    depth = ndimage.distance_transform_edt(np.pad(component, 1))[1:-1, 1:-1]
    return depth > radius


def erode_plane(plane: np.ndarray, spec: str | int) -> tuple[np.ndarray, int]:
    """Erode each connected lesion of a 2D mask; a lesion that would vanish is eroded by 1 px
    instead, or kept as is. Returns (eroded mask, largest radius applied)."""
    out = np.zeros_like(plane, dtype=bool)
    applied = 0
    components, count = ndimage.label(plane)
    for index in range(1, count + 1):
        component = components == index
        if spec == "auto":
            radius = round(AUTO_FRACTION * math.sqrt(component.sum() / math.pi))
        else:
            radius = int(spec)
        eroded = _erode(component, radius) if radius else component
        if not eroded.any() and radius > 1:
            eroded, radius = _erode(component, 1), 1
        if not eroded.any():
            eroded, radius = component, 0
        out |= eroded
        applied = max(applied, radius)
    return out, applied


def erode_label(label: np.ndarray, foreground: np.ndarray, axis: int, spec: str | int,
                changed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Erode the lesion ``foreground`` in-plane along ``axis``; with ``changed`` (pixels the model
    altered), also drop lesion pixels it left as they were (holes filled; never to empty).
    Returns (label, foreground, the applied erosion for the manifest). Other labels are kept."""
    spec = parse_erode(spec)
    eroded = np.zeros_like(foreground, dtype=bool)
    out_stack, fg_stack = slice_stack(eroded, axis), slice_stack(foreground, axis)
    changed_stack = slice_stack(changed, axis) if changed is not None else None
    radii = []
    for s, plane in enumerate(fg_stack):
        if not plane.any():
            continue
        if spec == 0:
            out_stack[s] = plane
            radii.append(0)
            continue
        out_stack[s], radius = erode_plane(plane, spec)
        radii.append(radius)
        if changed_stack is not None:
            kept = out_stack[s] & ndimage.binary_fill_holes(changed_stack[s])
            if kept.any():
                out_stack[s] = kept
    out_label = np.where(foreground & ~eroded, 0, label).astype(label.dtype)
    total = int(foreground.sum())
    details = {"mode": spec, "radius_px": radii, "removed_px": total - int(eroded.sum()),
               "kept_fraction": round(float(eroded.sum()) / max(total, 1), 4),
               "to_changed_region": changed is not None}
    return out_label, eroded, details
