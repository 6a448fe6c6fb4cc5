"""Slice-to-slice coherence of a volume inside a mask: does a slice-wise generated lesion look like
one 3D object or like a stack of unrelated slices?

All three statistics are scale-free, so a synthetic volume is compared with the real volume it was
painted into (the same statistic on the real lesion):
- ``adjacent_correlation``: mean Pearson correlation of adjacent slices over the pixels inside the
  mask on both (1 = identical slices, ~0 = unrelated);
- ``through_plane_ratio``: mean squared difference between adjacent slices over the mean squared
  in-plane neighbour difference (the average of the two in-plane axes), inside the mask on both
  voxels; about 1 for an isotropic texture sampled at equal spacing, larger when slices disagree;
- ``profile_roughness``: mean absolute second difference of the per-slice mean intensity inside
  the mask, over the intensity standard deviation inside it (0 for a linear trend along the axis).
"""

from __future__ import annotations

import numpy as np

from .slicing import slice_stack


def _pairs(values: np.ndarray, mask: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour pairs along ``axis`` with both voxels inside the mask."""
    ahead = [slice(None)] * values.ndim
    behind = [slice(None)] * values.ndim
    ahead[axis], behind[axis] = slice(1, None), slice(None, -1)
    both = mask[tuple(ahead)] & mask[tuple(behind)]
    return values[tuple(behind)][both], values[tuple(ahead)][both]


def _mean_squared_step(values: np.ndarray, mask: np.ndarray, axis: int) -> float:
    first, second = _pairs(values, mask, axis)
    return float(np.mean((second - first) ** 2)) if first.size else float("nan")


def adjacent_correlation(image: np.ndarray, mask: np.ndarray, axis: int) -> float:
    """Mean correlation of adjacent slices inside the mask (pairs with < 3 common pixels or a
    constant slice are left out; NaN when none is left)."""
    values, inside = slice_stack(image.astype(np.float64), axis), slice_stack(mask.astype(bool), axis)
    scores = []
    for s in range(len(values) - 1):
        common = inside[s] & inside[s + 1]
        a, b = values[s][common], values[s + 1][common]
        if a.size >= 3 and a.std() > 0 and b.std() > 0:
            scores.append(float(np.corrcoef(a, b)[0, 1]))
    return float(np.mean(scores)) if scores else float("nan")


def through_plane_ratio(image: np.ndarray, mask: np.ndarray, axis: int) -> float:
    """Mean squared step across slices over the mean squared in-plane step, inside the mask."""
    values, inside = image.astype(np.float64), mask.astype(bool)
    in_plane = [a for a in range(3) if a != axis]
    planar = np.mean([_mean_squared_step(values, inside, a) for a in in_plane])
    return _mean_squared_step(values, inside, axis) / planar if planar > 0 else float("nan")


def profile_roughness(image: np.ndarray, mask: np.ndarray, axis: int) -> float:
    """Mean |second difference| of the per-slice mean inside the mask, over the std inside it."""
    values, inside = slice_stack(image.astype(np.float64), axis), slice_stack(mask.astype(bool), axis)
    means = np.array([values[s][inside[s]].mean() for s in range(len(values)) if inside[s].any()])
    scale = image[mask.astype(bool)].std()
    if len(means) < 3 or scale == 0:
        return float("nan")
    return float(np.mean(np.abs(np.diff(means, n=2))) / scale)


def coherence(image: np.ndarray, mask: np.ndarray, axis: int) -> dict[str, float]:
    """All three statistics of ``image`` (Z, Y, X) inside ``mask`` along ``axis``."""
    return {"adjacent_correlation": adjacent_correlation(image, mask, axis),
            "through_plane_ratio": through_plane_ratio(image, mask, axis),
            "profile_roughness": profile_roughness(image, mask, axis)}
