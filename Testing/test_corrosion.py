"""Mask corrosion: the output label is a non-empty, in-plane eroded subset of the guide mask."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from MedDiffFTLib.corrosion import erode_label
from MedDiffFTLib.errors import MedDiffFTError


def disc(shape, centre, radius) -> np.ndarray:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def test_auto_radius_scales_with_the_lesion_and_keeps_a_subset():
    big = disc((120, 120), (60, 60), 40)[None]
    label = big.astype(np.uint8) * 3
    out_label, out_fg, details = erode_label(label, big, 0, "auto")
    # equivalent radius 40 px -> 5 % -> 2 px: exactly the pixels deeper than 2 px stay
    depth = ndimage.distance_transform_edt(big[0])
    assert details["radius_px"] == [2] and details["mode"] == "auto"
    assert np.array_equal(out_fg[0], depth > 2)
    assert np.array_equal(out_label, np.where(out_fg, 3, 0))
    assert details["removed_px"] == int(big.sum() - out_fg.sum()) > 0
    small = disc((40, 40), (20, 20), 6)[None]  # under ~10 px radius: kept as drawn
    _, small_fg, small_details = erode_label(small.astype(np.uint8), small, 0, "auto")
    assert small_details["radius_px"] == [0] and np.array_equal(small_fg, small)


def test_never_to_empty_and_other_labels_are_kept():
    guide = np.zeros((1, 20, 20), bool)
    guide[0, 5:7, 5:9] = True  # 2 px thin: any erosion empties it
    label = guide.astype(np.uint8)
    label[0, 15:18, 15:18] = 2  # another structure, not the lesion
    out_label, out_fg, details = erode_label(label, guide, 0, "5")
    assert np.array_equal(out_fg, guide) and details["radius_px"] == [0]
    assert (out_label[0, 15:18, 15:18] == 2).all()
    wide = np.zeros((1, 20, 20), bool)
    wide[0, 4:8, 2:18] = True  # 4 px thick: 5 px would empty it, 1 px does not
    _, wide_fg, wide_details = erode_label(wide.astype(np.uint8), wide, 0, "5")
    assert wide_details["radius_px"] == [1] and wide_fg.any() and (wide_fg <= wide).all()
    assert np.array_equal(wide_fg[0], ndimage.distance_transform_edt(np.pad(wide[0], 1))[1:-1, 1:-1] > 1)


def test_volumes_erode_in_plane_per_slice():
    volume = np.zeros((5, 40, 30), bool)
    for z, radius in zip(range(5), (3, 12, 14, 12, 3)):
        volume[z] = disc((40, 30), (20, 15), radius)
    moved = np.moveaxis(volume, 0, 2)  # slicing axis 2
    _, out_fg, details = erode_label(moved.astype(np.uint8), moved, 2, "2")
    out = np.moveaxis(out_fg, 2, 0)
    assert (out <= volume).all()
    assert all(out[z].any() for z in range(5))  # a 3D erosion would drop the end slices
    assert details["radius_px"] == [2, 2, 2, 2, 2]
    for z in range(5):
        assert np.array_equal(out[z], ndimage.distance_transform_edt(np.pad(volume[z], 1))[1:-1, 1:-1] > 2)


def test_zero_keeps_the_guide_and_changed_region_trims():
    guide = disc((60, 60), (30, 30), 20)[None]
    label, fg, details = erode_label(guide.astype(np.uint8), guide, 0, "0")
    assert np.array_equal(fg, guide) and details["removed_px"] == 0
    changed = np.zeros_like(guide)
    changed[0, :, :30] = True  # the model changed the left half only
    changed[0, 20, 10] = False  # an unchanged pixel inside the changed part: a hole, filled
    _, trimmed, trimmed_details = erode_label(guide.astype(np.uint8), guide, 0, "auto", changed=changed)
    eroded = ndimage.distance_transform_edt(guide[0]) > 1
    assert trimmed_details["to_changed_region"] and trimmed_details["radius_px"] == [1]
    assert np.array_equal(trimmed[0], eroded & (np.arange(60) < 30)[None, :])
    _, kept, _ = erode_label(guide.astype(np.uint8), guide, 0, "auto", changed=np.zeros_like(guide))
    assert np.array_equal(kept[0], eroded)  # nothing changed: never to empty, the erosion stays


@pytest.mark.parametrize("spec, message", [("-1", r"--erode -1: the radius must be 0 or more px\."),
                                           ("big", r"--erode big: use auto, 0 \(no erosion\) or a radius in px\.")])
def test_bad_erode_values_name_the_fix(spec, message):
    with pytest.raises(MedDiffFTError, match=message):
        erode_label(np.zeros((1, 4, 4), np.uint8), np.zeros((1, 4, 4), bool), 0, spec)
