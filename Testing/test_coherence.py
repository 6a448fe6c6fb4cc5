"""Slice-to-slice coherence statistics on hand-made volumes with known values."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import COMMON, TRAIN_TINY, read

from MedDiffFTLib.cli import run_command
from MedDiffFTLib.coherence import adjacent_correlation, coherence, profile_roughness, through_plane_ratio
from MedDiffFTLib.errors import MedDiffFTError
from MedDiffFTLib.generate import SampleSettings, _work_order, generate_samples
from MedDiffFTLib.progress import Progress


def ramp_volume(a: float, b: float, shape=(5, 6, 7)) -> np.ndarray:
    """I[z, y, x] = a * x + b * z: in-plane steps a (x) and 0 (y), through-plane steps b."""
    z, _, x = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]]
    return a * x + b * z


def test_through_plane_ratio_of_a_ramp_is_exact():
    mask = np.ones((5, 6, 7), bool)
    # through-plane b^2 over the in-plane mean (a^2 + 0) / 2
    assert through_plane_ratio(ramp_volume(2.0, 3.0), mask, axis=0) == pytest.approx(2 * 9 / 4)
    # slicing along x instead: through-plane a^2 over (b^2 + 0) / 2
    assert through_plane_ratio(ramp_volume(2.0, 3.0), mask, axis=2) == pytest.approx(2 * 4 / 9)


def test_mask_restricts_the_pairs():
    image = ramp_volume(1.0, 1.0)
    image[3:] += 100.0  # a jump between slices 2 and 3 ...
    mask = np.zeros(image.shape, bool)
    mask[:3] = True  # ... outside the mask's pairs: slices 0-1 and 1-2 only
    assert through_plane_ratio(image, mask, axis=0) == pytest.approx(2.0)


def test_adjacent_correlation_of_shifted_flipped_and_unrelated_slices():
    rng = np.random.default_rng(0)
    pattern = rng.standard_normal((8, 8))
    mask = np.ones((3, 8, 8), bool)
    assert adjacent_correlation(np.stack([pattern, pattern + 5, 2 * pattern]), mask, 0) == pytest.approx(1.0)
    assert adjacent_correlation(np.stack([pattern, -pattern, pattern]), mask, 0) == pytest.approx(-1.0)
    unrelated = rng.standard_normal((40, 64, 64))
    assert abs(adjacent_correlation(unrelated, np.ones(unrelated.shape, bool), 0)) < 0.01


def test_profile_roughness_is_zero_for_a_linear_trend_and_exact_for_a_parabola():
    mask = np.ones((5, 4, 4), bool)
    assert profile_roughness(ramp_volume(1.0, 2.0, (5, 4, 4)), mask, 0) == pytest.approx(0.0)
    z = np.arange(5, dtype=float)[:, None, None] * np.ones((5, 4, 4))
    parabola = z ** 2  # slice means 0, 1, 4, 9, 16: second differences 2
    assert profile_roughness(parabola, mask, 0) == pytest.approx(2 / parabola.std())


def test_too_little_mask_gives_nan():
    image = ramp_volume(1.0, 1.0)
    mask = np.zeros(image.shape, bool)
    mask[2, 1:3, 1:3] = True  # one slice: no pair across slices, no profile
    values = coherence(image, mask, 0)
    assert all(np.isnan(v) for v in values.values())


def test_propagation_order_starts_at_the_centre_and_moves_out_one_slice_per_pass():
    windows = [object()] * 5
    waves, neighbour = _work_order(SampleSettings(slice_coherence="propagate"), windows)
    assert waves == [[2], [3, 1], [4, 0]]
    assert neighbour == {0: 1, 1: 2, 3: 2, 4: 3}
    assert _work_order(SampleSettings(slice_coherence="propagate"), [object()] * 4)[0] == [[2], [3, 1], [0]]


def test_propagation_keeps_the_background_and_changes_the_lesion(tmp_path, volume_case):
    image_path, label_path = volume_case(".nrrd")
    model = tmp_path / "model"
    run_command(["finetune", "--image", image_path, "--label", label_path, "--model-out", model,
                 *TRAIN_TINY, "--qa", "off", "--mask-steps", "0", *COMMON])
    outputs = {}
    for name in ("independent", "propagate"):
        run_command(["sample", "--model", model, "--image", image_path, "--label", label_path,
                     "--out", tmp_path / name, "--slice-coherence", name, "--mask-source", "label",
                     "--samples", "1", "--sampling-steps", "3", "--qa", "off", "--seam", "0", *COMMON])
        entry = json.loads((tmp_path / name / "manifest.json").read_text())["samples"][0]
        outputs[name] = sitk.GetArrayFromImage(read(tmp_path / name / entry["image"]))
    source = sitk.GetArrayFromImage(read(image_path))
    lesion = sitk.GetArrayFromImage(read(label_path)) > 0
    assert np.array_equal(outputs["propagate"][~lesion], source[~lesion])  # seam 0: only the lesion changes
    assert not np.array_equal(outputs["propagate"][lesion], outputs["independent"][lesion])
    with pytest.raises(MedDiffFTError, match="--slice-coherence sideways: use independent, propagate"):
        generate_samples(None, {}, {}, None, settings=SampleSettings(slice_coherence="sideways"),
                         progress=Progress())
