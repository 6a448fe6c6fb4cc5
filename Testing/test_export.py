"""`meddiffft export nnunet|monai`: real and synthetic pairs side by side, in the target tool's format."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import COMMON, SAMPLE_TINY, TRAIN_TINY, geometry, make_volume, read, write_volume
from PIL import Image

from MedDiffFTLib.cli import run_command
from MedDiffFTLib.errors import MedDiffFTError

NNUNET_ABSENT = ("nnunetv2 is not installed (its torchvision dependency breaks transformers with the "
                 "CPU torch 2.13.0 build); the format is checked field by field instead")


@pytest.fixture(scope="module")
def volume_run(tmp_path_factory):
    """A real NIfTI case with labels {0, 1, 3} (CSV) and a tiny run folder made from it."""
    folder = tmp_path_factory.mktemp("volumes")
    image, label = make_volume(0)
    label[4, 5:8, 5:8] = 3  # a second structure, so the values need renumbering
    image_path = write_volume(image, folder / "real.nii.gz")
    label_path = write_volume(label, folder / "real_label.nii.gz")
    (folder / "train.csv").write_text("image,label\nreal.nii.gz,real_label.nii.gz\n")
    run_command(["run", "--image", image_path, "--label", label_path, "--out", folder / "run",
                 *TRAIN_TINY, *SAMPLE_TINY, *COMMON])
    return folder


def export(*argv):
    return run_command(["export", *argv, "--progress", "none"])


def test_nnunet_dataset_fields_files_and_sidecar(tmp_path, volume_run):
    result = export("nnunet", "--from", volume_run / "run", "--real", volume_run / "train.csv",
                    "--dataset-id", "7", "--name", "Synth", "--out", tmp_path / "raw")
    folder = tmp_path / "raw" / "Dataset007_Synth"
    assert result["out"] == str(folder) and (result["real"], result["synthetic"]) == (1, 2)
    dataset = json.loads((folder / "dataset.json").read_text())
    assert {k: dataset[k] for k in ("channel_names", "labels", "numTraining", "file_ending")} == {
        "channel_names": {"0": "image"}, "labels": {"background": 0, "label_1": 1, "label_3": 2},
        "numTraining": 3, "file_ending": ".nii.gz"}
    ids = ["Synth_0001", "Synth_0002", "Synth_0003"]
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [f"{i}_0000.nii.gz" for i in ids]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"{i}.nii.gz" for i in ids]
    sidecar = json.loads((folder / "meddiffft_cases.json").read_text())
    assert sidecar["synthetic"] == ids[1:]
    manifest = json.loads((volume_run / "run" / "manifest.json").read_text())
    for entry, sample in zip(sidecar["cases"][1:], manifest["samples"]):
        assert entry["image_source"] == str(volume_run / "run" / sample["image"])
        assert entry["seed"] == sample["seed"]
    real_image, real_label = read(volume_run / "real.nii.gz"), read(volume_run / "real_label.nii.gz")
    exported_image = read(folder / "imagesTr" / "Synth_0001_0000.nii.gz")
    exported_label = sitk.GetArrayFromImage(read(folder / "labelsTr" / "Synth_0001.nii.gz"))
    assert geometry(exported_image) == geometry(real_image)
    assert np.array_equal(sitk.GetArrayFromImage(exported_image), sitk.GetArrayFromImage(real_image))
    remapped = np.array([0, 1, 0, 2])[sitk.GetArrayFromImage(real_label)]
    assert np.array_equal(exported_label, remapped)
    for case_id in ids:  # what nnU-Net's integrity check verifies: grids agree, labels declared
        image = read(folder / "imagesTr" / f"{case_id}_0000.nii.gz")
        label = read(folder / "labelsTr" / f"{case_id}.nii.gz")
        assert geometry(image)[:4] == geometry(label)[:4] == geometry(real_image)[:4]
        assert set(np.unique(sitk.GetArrayFromImage(label))) <= set(dataset["labels"].values())


def test_nnunet_dataset_passes_nnunets_own_integrity_check(tmp_path, volume_run, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    verify = pytest.importorskip("nnunetv2.experiment_planning.verify_dataset_integrity",
                                 reason=NNUNET_ABSENT)
    export("nnunet", "--from", volume_run / "run", "--real", volume_run / "train.csv",
           "--dataset-id", "7", "--name", "Synth", "--out", tmp_path / "raw")
    verify.verify_dataset_integrity(str(tmp_path / "raw" / "Dataset007_Synth"), num_processes=1)


def test_nnunet_pictures_become_png_with_consecutive_labels(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for k in range(2):
        Image.fromarray(np.full((20, 24), 40 * k + 30, np.uint8)).save(run_dir / f"sample_{k}.png")
        mask = np.zeros((20, 24), np.uint8)
        mask[5:9, 6:12] = 255
        Image.fromarray(mask).save(run_dir / f"sample_{k}_label.png")
    (run_dir / "manifest.json").write_text(json.dumps({"samples": [
        {"image": f"sample_{k}.png", "label": f"sample_{k}_label.png", "seed": k} for k in range(2)]}))
    export("nnunet", "--from", run_dir, "--dataset-id", "12", "--name", "Pics", "--out", tmp_path / "raw")
    folder = tmp_path / "raw" / "Dataset012_Pics"
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["file_ending"] == ".png" and dataset["labels"] == {"background": 0, "label_255": 1}
    label = np.asarray(Image.open(folder / "labelsTr" / "Pics_0002.png"))
    assert label.dtype == np.uint8 and set(np.unique(label)) == {0, 1} and label[6, 7] == 1
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    verify = pytest.importorskip("nnunetv2.experiment_planning.verify_dataset_integrity",
                                 reason=NNUNET_ABSENT)
    verify.verify_dataset_integrity(str(folder), num_processes=1)


def test_nnunet_refuses_clashing_ids_existing_output_and_bad_names(tmp_path, volume_run):
    base = ["nnunet", "--from", volume_run / "run", "--out", tmp_path / "raw"]
    (tmp_path / "raw" / "Dataset007_Other").mkdir(parents=True)
    with pytest.raises(MedDiffFTError, match="already holds Dataset007_Other with id 7; nnU-Net needs "
                                             "unique ids"):
        export(*base, "--dataset-id", "7", "--name", "Synth")
    with pytest.raises(MedDiffFTError, match="nnU-Net dataset ids are 1 to 999"):
        export(*base, "--dataset-id", "1000", "--name", "Synth")
    with pytest.raises(MedDiffFTError, match="use letters, digits, '_' and '-' only"):
        export(*base, "--dataset-id", "8", "--name", "my data")
    export(*base, "--dataset-id", "8", "--name", "Synth")
    with pytest.raises(MedDiffFTError, match="already exists and is not empty.*--overwrite"):
        export(*base, "--dataset-id", "8", "--name", "Synth")
    export(*base, "--dataset-id", "8", "--name", "Synth", "--overwrite")


def test_from_needs_a_run_folder(tmp_path):
    with pytest.raises(MedDiffFTError, match=r"--from .*: no manifest.json there; pass a folder "
                                             r"written by `meddiffft run`"):
        export("monai", "--from", tmp_path, "--out", tmp_path / "list.json")


def test_monai_datalist_loads_with_monai_and_flags_synthetic(tmp_path, volume_run):
    from monai.data import load_decathlon_datalist

    out = tmp_path / "lists" / "datalist.json"
    export("monai", "--from", volume_run / "run", "--real", volume_run / "train.csv", "--out", out)
    items = load_decathlon_datalist(str(out), is_segmentation=True, data_list_key="training")
    assert [item["synthetic"] for item in items] == [False, True, True]
    assert items[0]["image"] == str((volume_run / "real.nii.gz").resolve())
    manifest = json.loads((volume_run / "run" / "manifest.json").read_text())
    assert [item["label"] for item in items[1:]] == [
        str((volume_run / "run" / s["label"]).resolve()) for s in manifest["samples"]]
    assert json.loads(out.read_text())["training"][0]["image"].startswith("..")  # relative paths
    with pytest.raises(MedDiffFTError, match="already exists; choose another file or pass --overwrite"):
        export("monai", "--from", volume_run / "run", "--out", out)
