"""Real data from ../shared/data (BUSI ultrasound, MSD Hippocampus MRI) through finetune + sample.
Skipped, with the reason, when the data folder is absent."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import COMMON, SAMPLE_TINY, SHARED_DATA, TRAIN_TINY, geometry

from MedDiffFTLib.cli import run_command
from MedDiffFTLib.generate import seam_weights

BUSI = SHARED_DATA / "BUSI" / "benign"
HIPPOCAMPUS = SHARED_DATA / "MSD-Task04-Hippocampus"

pytestmark = pytest.mark.realdata


def finetune_then_sample(tmp_path, image, label):
    run_command(["finetune", "--image", image, "--label", label, "--model-out", tmp_path / "model",
                 *TRAIN_TINY, *COMMON])
    run_command(["sample", "--model", tmp_path / "model", "--image", image, "--label", label,
                 "--out", tmp_path / "out", *SAMPLE_TINY, *COMMON, "--mask-source", "label", "--erode", "0"])
    return json.loads((tmp_path / "out" / "manifest.json").read_text())["samples"]


@pytest.mark.skipif(not BUSI.is_dir(), reason=f"BUSI data not found at {BUSI}")
def test_busi_image(tmp_path):
    from PIL import Image

    image, label = BUSI / "images" / "benign (6).png", BUSI / "mask" / "benign (6)_mask.png"
    entries = finetune_then_sample(tmp_path, image, label)
    source = np.asarray(Image.open(image))
    mask = np.asarray(Image.open(label)) > 0
    for entry in entries:
        sample = np.asarray(Image.open(tmp_path / "out" / entry["image"]))
        assert sample.shape == source.shape and sample.dtype == source.dtype
        far = seam_weights(mask, 3) == 0
        assert np.array_equal(sample[far], source[far])
        assert not np.array_equal(sample[mask], source[mask])


@pytest.mark.skipif(not HIPPOCAMPUS.is_dir(), reason=f"Hippocampus data not found at {HIPPOCAMPUS}")
def test_hippocampus_volume(tmp_path):
    image = HIPPOCAMPUS / "imagesTr" / "hippocampus_001.nii.gz"
    label = HIPPOCAMPUS / "labelsTr" / "hippocampus_001.nii.gz"
    entries = finetune_then_sample(tmp_path, image, label)
    source = sitk.ReadImage(str(image))
    source_label = sitk.GetArrayFromImage(sitk.ReadImage(str(label)))
    for entry in entries:
        sample = sitk.ReadImage(str(tmp_path / "out" / entry["image"]))
        out_label = sitk.ReadImage(str(tmp_path / "out" / entry["label"]))
        assert geometry(sample) == geometry(source)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(out_label), source_label)  # labels 1, 2 kept
        array, original = sitk.GetArrayFromImage(sample), sitk.GetArrayFromImage(source)
        lesion_slices = set(np.flatnonzero(source_label.reshape(len(source_label), -1).any(1)))
        assert set(entry["slices"]) == lesion_slices
        for z in set(range(len(array))) - lesion_slices:
            assert np.array_equal(array[z], original[z])
