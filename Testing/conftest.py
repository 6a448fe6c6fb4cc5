"""Shared fixtures: small synthetic cases with oblique, anisotropic geometry, and tiny settings
that make a fine-tune + sample run take seconds on a CPU."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TRAIN_TINY = ["--model-size", "tiny", "--resolution", "32", "--train-steps", "4", "--batch-size", "2",
              "--checkpoint-every", "2", "--qa-folds", "2", "--qa-segmenter-steps", "2",
              "--qa-segmenter-resolution", "16", "--mask-steps", "2", "--mask-resolution", "16"]
# A 4-step model paints noise, which quality assessment rightly rejects: tests of other stages
# sample without it (Testing/test_quality.py tests it on).
SAMPLE_TINY = ["--samples", "2", "--sampling-steps", "3", "--qa", "off"]
COMMON = ["--device", "cpu", "--progress", "none"]


def oblique_direction() -> tuple[float, ...]:
    a, b = 0.3, 0.2
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return tuple((rz @ rx).ravel())


def make_volume(seed: int = 0, shape=(6, 28, 24)) -> tuple[np.ndarray, np.ndarray]:
    """An int16 textured volume with a dark blob lesion on slices 2..3 (array order Z, Y, X)."""
    rng = np.random.default_rng(seed)
    image = (400 + 60 * rng.standard_normal(shape)).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    zz, yy, xx = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]]
    blob = ((yy - 13) ** 2 / 25 + (xx - 11) ** 2 / 16 < 1) & (zz >= 2) & (zz <= 3)
    label[blob] = 1
    image[blob] -= 250
    return image, label


def write_volume(array: np.ndarray, path: Path, *, spacing=(0.7, 0.9, 3.1), origin=(10.5, -20.25, 33.3),
                 direction=None) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction or oblique_direction())
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def volume_case(tmp_path):
    """Factory: (image path, label path) of an oblique anisotropic volume in a given format."""

    def make(suffix: str = ".nrrd", seed: int = 0) -> tuple[Path, Path]:
        image, label = make_volume(seed)
        return (write_volume(image, tmp_path / f"image{seed}{suffix}"),
                write_volume(label, tmp_path / f"label{seed}{suffix}"))

    return make


@pytest.fixture
def picture_case(tmp_path):
    """A grey-stored-as-RGB PNG (like BUSI) with a {0,255} mask PNG."""
    from PIL import Image

    from MedDiffFTLib.phantom import ultrasound_phantom

    image, mask = ultrasound_phantom(seed=3, size=96)
    rgb = np.repeat(image[..., None], 3, axis=-1)
    Image.fromarray(rgb).save(tmp_path / "us.png")
    Image.fromarray(mask).save(tmp_path / "us_mask.png")
    return tmp_path / "us.png", tmp_path / "us_mask.png"


def read(path) -> sitk.Image:
    return sitk.ReadImage(str(path))


def geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection(), \
        image.GetPixelIDValue()
