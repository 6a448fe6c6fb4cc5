"""Case I/O details and every documented bad input: a clear error, and nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import COMMON, SAMPLE_TINY, TRAIN_TINY, make_volume, write_volume

from MedDiffFTLib.caseio import read_case
from MedDiffFTLib.cli import run_command
from MedDiffFTLib.errors import MedDiffFTError
from MedDiffFTLib.slicing import choose_axis, fit_intensity


def run_args(tmp_path, image, label):
    return ["run", "--image", image, "--label", label, "--out", tmp_path / "out", *TRAIN_TINY,
            *SAMPLE_TINY, *COMMON]


def assert_refused(tmp_path, argv, message):
    with pytest.raises(MedDiffFTError, match=message):
        run_command(argv)
    assert not (tmp_path / "out").exists()


def test_missing_file(tmp_path, volume_case):
    image, label = volume_case()
    assert_refused(tmp_path, run_args(tmp_path, tmp_path / "nope.nrrd", label), "does not exist")


def test_unreadable_file(tmp_path, volume_case):
    image, label = volume_case()
    (tmp_path / "broken.nrrd").write_bytes(b"NRRD0004\nthis is not an image\n")
    assert_refused(tmp_path, run_args(tmp_path, tmp_path / "broken.nrrd", label), "could not be read")


def test_empty_label(tmp_path, volume_case):
    image, _ = volume_case()
    empty = write_volume(np.zeros((6, 28, 24), np.uint8), tmp_path / "empty.nrrd")
    assert_refused(tmp_path, run_args(tmp_path, image, empty), "is empty")


def test_empty_chosen_segment(tmp_path, volume_case):
    image, label = volume_case()
    assert_refused(tmp_path, [*run_args(tmp_path, image, label), "--segment", "7"],
                   "segment '7' of .* is empty")


def test_grid_mismatch_and_resample_label(tmp_path, volume_case):
    image, _ = volume_case()
    _, label = make_volume()
    shifted = write_volume(label, tmp_path / "shifted.nrrd", spacing=(0.8, 0.9, 3.1))
    assert_refused(tmp_path, run_args(tmp_path, image, shifted), "not on the image's grid.*--resample-label")
    case = read_case(str(image), str(shifted), resample_label=True)
    assert case.label.shape == case.image.shape and case.foreground.any()


def test_label_cropped_to_a_subgrid_is_embedded_exactly(tmp_path, volume_case):
    image_path, _ = volume_case()
    image = sitk.ReadImage(str(image_path))
    _, label = make_volume()
    cropped = sitk.GetImageFromArray(label[1:5, 5:20, 4:18])
    cropped.SetSpacing(image.GetSpacing())
    cropped.SetDirection(image.GetDirection())
    cropped.SetOrigin(image.TransformIndexToPhysicalPoint((4, 5, 1)))
    sitk.WriteImage(cropped, str(tmp_path / "cropped.nrrd"))
    case = read_case(str(image_path), str(tmp_path / "cropped.nrrd"))
    np.testing.assert_array_equal(case.label, label)


def test_vector_and_4d_images_are_refused(tmp_path, volume_case):
    _, label = volume_case()
    vector = sitk.Compose([sitk.GetImageFromArray(make_volume()[0])] * 3)
    sitk.WriteImage(vector, str(tmp_path / "vector.nrrd"))
    assert_refused(tmp_path, run_args(tmp_path, tmp_path / "vector.nrrd", label), "scalar 2D or 3D image")
    four_d = sitk.GetImageFromArray(np.zeros((2, 6, 28, 24), np.int16))
    sitk.WriteImage(four_d, str(tmp_path / "4d.nrrd"))
    assert_refused(tmp_path, run_args(tmp_path, tmp_path / "4d.nrrd", label), "scalar 2D or 3D image")


def test_nan_intensities(tmp_path, volume_case):
    _, label = volume_case()
    image = make_volume()[0].astype(np.float32)
    image[3, 4, 4] = np.nan
    path = write_volume(image, tmp_path / "nan.nrrd")
    assert_refused(tmp_path, run_args(tmp_path, path, label), "NaN or Inf")


def test_model_folder_of_another_backbone_or_version(tmp_path, volume_case):
    image, label = volume_case()
    run_command(["finetune", "--image", image, "--label", label, "--model-out", tmp_path / "model",
                 *TRAIN_TINY, *COMMON])
    card_path = tmp_path / "model" / "meddiffft.json"
    card = json.loads(card_path.read_text())
    sample = ["sample", "--model", tmp_path / "model", "--image", image, "--label", label,
              "--out", tmp_path / "out", *SAMPLE_TINY, *COMMON]
    card_path.write_text(json.dumps({**card, "backbone": "mystery"}))
    assert_refused(tmp_path, sample, "'mystery' backbone")
    card_path.write_text(json.dumps({**card, "format_version": 99}))
    assert_refused(tmp_path, sample, "model format 99.*Fine-tune the model again")
    assert_refused(tmp_path, [*sample[:2], tmp_path / "elsewhere", *sample[3:]], "does not exist")


def test_existing_output_folder_is_kept(tmp_path, volume_case):
    image, label = volume_case()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    with pytest.raises(MedDiffFTError, match="already exists.*--overwrite"):
        run_command(run_args(tmp_path, image, label))
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"
    run_command([*run_args(tmp_path, image, label), "--overwrite"])
    assert not (tmp_path / "out" / "precious.txt").exists()
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_atomic_writes_of_one_file_by_two_writers_at_once_and_a_failed_write(tmp_path):
    """Two processes finishing the same evaluation write its settings at once: each writer has its
    own temporary file, the last to finish wins, and a failed write leaves the old file and no
    temporary behind."""
    from MedDiffFTLib.outputs import atomic_file, write_json

    path = tmp_path / "settings.json"
    with atomic_file(path) as first, atomic_file(path) as second:
        first.write_text("first")
        second.write_text("second")
    assert path.read_text() == "first" and first != second  # the inner block (second) finished first
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    write_json(tmp_path / "other.json", {"a": 1})
    assert path.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.json", "settings.json"]


def test_training_set_without_any_mask(tmp_path, volume_case):
    image, _ = volume_case()
    empty = write_volume(np.zeros((6, 28, 24), np.uint8), tmp_path / "empty.nrrd")
    with pytest.raises(MedDiffFTError, match="None of the training labels contains any mask"):
        run_command(["finetune", "--image", image, "--label", empty, "--model-out",
                     tmp_path / "model", *TRAIN_TINY, *COMMON])
    assert not (tmp_path / "model").exists()


def test_unpaired_images_and_labels(tmp_path, volume_case):
    image, label = volume_case()
    assert_refused(tmp_path, ["run", "--image", image, "--image", image, "--label", label, "--out",
                              tmp_path / "out", *COMMON], "2 --image and 1 --label")


def test_inputs_are_not_modified(tmp_path, volume_case):
    image, label = volume_case()
    before = image.read_bytes(), label.read_bytes()
    run_command(run_args(tmp_path, image, label))
    assert (image.read_bytes(), label.read_bytes()) == before


def test_seg_nrrd_segment_by_name(tmp_path, volume_case):
    import nrrd

    image_path, _ = volume_case()
    image = sitk.ReadImage(str(image_path))
    _, label = make_volume()
    layer = label.astype(np.uint8)
    layer[0, 0:3, 0:3] = 2  # a second segment
    directions = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    header = {"space": "left-posterior-superior", "space directions": directions.T,
              "space origin": np.asarray(image.GetOrigin()), "kinds": ["domain"] * 3,
              "Segment0_ID": "Segment_1", "Segment0_Name": "tumor", "Segment0_LabelValue": "1",
              "Segment0_Layer": "0", "Segment0_Color": "1 0 0",
              "Segment1_ID": "Segment_2", "Segment1_Name": "marker", "Segment1_LabelValue": "2",
              "Segment1_Layer": "0", "Segment1_Color": "0 1 0"}
    nrrd.write(str(tmp_path / "label.seg.nrrd"), layer, header=header, index_order="C")
    case = read_case(str(image_path), str(tmp_path / "label.seg.nrrd"), segment="tumor")
    np.testing.assert_array_equal(case.foreground, label > 0)
    everything = read_case(str(image_path), str(tmp_path / "label.seg.nrrd"))
    assert everything.foreground.sum() == case.foreground.sum() + 9
    with pytest.raises(MedDiffFTError, match="Segments in the file: tumor, marker"):
        read_case(str(image_path), str(tmp_path / "label.seg.nrrd"), segment="liver")
    out = tmp_path / "out"
    run_command(["run", "--image", image_path, "--label", tmp_path / "label.seg.nrrd", "--segment",
                 "tumor", "--out", out, *TRAIN_TINY, *SAMPLE_TINY, *COMMON])
    entry = json.loads((out / "manifest.json").read_text())["samples"][0]
    assert entry["label"].endswith(".seg.nrrd")
    header_out = nrrd.read_header(str(out / entry["label"]))
    assert header_out["Segment0_Name"] == "tumor" and header_out["Segment1_Name"] == "marker"


def test_cases_csv(tmp_path, volume_case):
    first, second = volume_case(seed=0), volume_case(seed=1)
    csv_path = tmp_path / "cases.csv"
    csv_path.write_text(f"image,label\n{first[0].name},{first[1].name}\n{second[0].name},{second[1].name}\n")
    result = run_command(["run", "--cases", csv_path, "--out", tmp_path / "out", *TRAIN_TINY,
                          "--samples", "1", "--sampling-steps", "2", "--qa", "off", *COMMON])
    entries = json.loads((tmp_path / "out" / "manifest.json").read_text())["samples"]
    assert result["samples"] == 2 and {e["source_image"] for e in entries} == {str(first[0]), str(second[0])}


@pytest.mark.parametrize("dtype,spec", [(np.uint8, "auto"), (np.int16, "auto"), (np.int16, "window:300,800")])
def test_intensity_inverse_is_exact(dtype, spec):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 255 if dtype == np.uint8 else 700, size=5000).astype(dtype)
    mapping = fit_intensity(values, spec)
    inside = (values >= mapping.low) & (values <= mapping.high)
    back = np.rint(mapping.inverse(mapping.forward(values))).astype(dtype)
    np.testing.assert_array_equal(back[inside], values[inside])


def test_axis_choice():
    assert choose_axis((3.1, 0.9, 0.7), "auto", False) == 0
    assert choose_axis((0.7, 0.9, 3.1), "auto", False) == 2
    assert choose_axis((1.0, 1.0, 1.0), "auto", False) == 0
    assert choose_axis((1.0, 1.0, 3.0), "1", False) == 1
    assert choose_axis((1.0, 1.0, 3.0), "auto", True) == 0
    with pytest.raises(MedDiffFTError, match="--axis 3"):
        choose_axis((1.0, 1.0, 1.0), "3", False)


def test_bad_options_raise_instead_of_exiting(tmp_path):
    with pytest.raises(MedDiffFTError, match="unrecognized arguments: --no-such-option"):
        run_command(["run", "--no-such-option", "--out", tmp_path / "out"])
    with pytest.raises(MedDiffFTError, match="invalid int value"):
        run_command(["sample", "--model", tmp_path, "--samples", "many", "--out", tmp_path / "out"])
