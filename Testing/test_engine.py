"""End-to-end properties of `meddiffft run/finetune/sample` with a tiny compact backbone."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import COMMON, SAMPLE_TINY, TRAIN_TINY, geometry, read
from safetensors.torch import load_file

from MedDiffFTLib.caseio import read_case
from MedDiffFTLib.cli import run_command
from MedDiffFTLib.errors import Cancelled
from MedDiffFTLib.generate import sample_seed, seam_weights

SEAM = 3


def run(tmp_path, image, label, out="out", *extra):
    """A tiny run painting the case's own label, uneroded (these tests compare outputs with it;
    the mask generator and corrosion are tested in test_mask_generator.py, test_corrosion.py)."""
    return run_command(["run", "--image", image, "--label", label, "--out", tmp_path / out,
                        "--seam", str(SEAM), *TRAIN_TINY, *SAMPLE_TINY, *COMMON,
                        "--mask-source", "label", "--erode", "0", *extra])


def manifest(out):
    return json.loads((out / "manifest.json").read_text())


def far_from(mask: np.ndarray, seam: int) -> np.ndarray:
    """Pixels farther than ``seam`` from ``mask``, in-plane per slice (axis 0)."""
    return np.stack([seam_weights(plane, seam) == 0 for plane in mask])


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_volume_geometry_pixel_type_and_background_are_kept(tmp_path, volume_case, suffix):
    image_path, label_path = volume_case(suffix)
    result = run(tmp_path, image_path, label_path)
    out = tmp_path / "out"
    source = read(image_path)
    source_array = sitk.GetArrayFromImage(source)
    label = sitk.GetArrayFromImage(read(label_path)) > 0
    entries = manifest(out)["samples"]
    assert len(entries) == 2 and result["samples"] == 2
    for entry in entries:
        assert entry["image"].endswith(suffix) and entry["label"].endswith(suffix)
        sample = read(out / entry["image"])
        sample_label = read(out / entry["label"])
        assert geometry(sample) == geometry(source)  # bit-exact spacing/origin/direction, pixel type
        assert geometry(sample_label)[:4] == geometry(source)[:4]
        array = sitk.GetArrayFromImage(sample)
        out_label = sitk.GetArrayFromImage(sample_label) > 0
        far = far_from(label, SEAM) & far_from(out_label, SEAM)
        assert np.array_equal(array[far], source_array[far])
        for z in (0, 1, 4, 5):  # slices without mask are identical
            assert np.array_equal(array[z], source_array[z])
        assert not np.array_equal(array[label], source_array[label])  # it painted
        assert array.min() >= source_array.min() and array.max() <= source_array.max()
        assert entry["slices"] == [2, 3]
    assert (out / "preview.png").is_file()
    assert manifest(out)["model"]["path"] == str(out / "model")
    assert (out / "model" / "meddiffft.json").is_file()
    assert (out / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (out / "model" / "checkpoints").exists()


def test_picture_round_trip_keeps_mode_and_background(tmp_path, picture_case):
    from PIL import Image

    image_path, label_path = picture_case
    run(tmp_path, image_path, label_path)
    out = tmp_path / "out"
    entry = manifest(out)["samples"][0]
    source = np.asarray(Image.open(image_path))
    with Image.open(out / entry["image"]) as im:
        assert im.mode == "RGB" and im.size == (96, 96)
        sample = np.asarray(im)
    label = np.asarray(Image.open(label_path)) > 0
    np.testing.assert_array_equal(np.asarray(Image.open(out / entry["label"])), np.asarray(Image.open(label_path)))
    far = seam_weights(label, SEAM) == 0
    assert np.array_equal(sample[far], source[far])
    assert (sample[..., 0] == sample[..., 2]).all()  # grey stays grey


def test_jitter_labels_stay_truthful(tmp_path, picture_case):
    from PIL import Image

    image_path, label_path = picture_case
    run(tmp_path, image_path, label_path, "out", "--jitter", "--samples", "3")
    out = tmp_path / "out"
    source = np.asarray(Image.open(image_path))[..., 0].astype(int)
    old = np.asarray(Image.open(label_path)) > 0
    for entry in manifest(out)["samples"]:
        new = np.asarray(Image.open(out / entry["label"])) > 0
        sample = np.asarray(Image.open(out / entry["image"]))[..., 0].astype(int)
        assert entry["mask_source"] == "jitter" and new.any() and not np.array_equal(new, old)
        assert new.sum() > 0.3 * old.sum()
        healed = old & ~new
        # every pixel of the old lesion outside the new label was regenerated (healed), none kept
        changed = sample[healed] != source[healed]
        assert changed.mean() > 0.9
        far = (seam_weights(old, SEAM) == 0) & (seam_weights(new, SEAM) == 0)
        assert np.array_equal(sample[far], source[far])


def test_seeds_reproduce_and_differ_and_reload_reproduces(tmp_path, volume_case):
    image_path, label_path = volume_case(".nrrd")
    run(tmp_path, image_path, label_path, "a")
    run(tmp_path, image_path, label_path, "b")
    a, b = tmp_path / "a", tmp_path / "b"

    def arrays(out, i):
        return sitk.GetArrayFromImage(read(out / manifest(out)["samples"][i]["image"]))

    assert np.array_equal(arrays(a, 0), arrays(b, 0))  # same seed -> identical
    assert not np.array_equal(arrays(a, 0), arrays(a, 1))  # another seed -> different
    # save/load: sampling from the saved model folder reproduces the run's outputs exactly
    run_command(["sample", "--model", a / "model", "--image", image_path, "--label", label_path,
                 "--out", tmp_path / "c", "--seam", str(SEAM), *SAMPLE_TINY, *COMMON,
                 "--mask-source", "label", "--erode", "0"])
    assert np.array_equal(arrays(a, 0), arrays(tmp_path / "c", 0))
    assert np.array_equal(arrays(a, 1), arrays(tmp_path / "c", 1))


def cancel_after_finetune_steps(events: list, steps: int):
    """A should_cancel callback: true once ``events`` hold ``steps`` fine-tune progress events."""
    return lambda: sum(1 for e in events if e.get("stage") == "finetune") >= steps


def test_resume_after_interruption_gives_the_same_weights(tmp_path, volume_case):
    image_path, label_path = volume_case(".nrrd")
    args = ["finetune", "--image", image_path, "--label", label_path, *TRAIN_TINY,
            "--train-steps", "6", *COMMON]
    run_command([*args, "--model-out", tmp_path / "full"])
    events = []
    cancel_after_four_steps = cancel_after_finetune_steps(events, 4)
    with pytest.raises(Cancelled):
        run_command([*args, "--model-out", tmp_path / "resumed"], on_progress=events.append,
                    should_cancel=cancel_after_four_steps)
    assert not (tmp_path / "resumed" / "meddiffft.json").exists()
    assert (tmp_path / "resumed" / "checkpoints" / "step-0000004").is_dir()
    run_command([*args, "--model-out", tmp_path / "resumed", "--resume"])
    full = load_file(str(tmp_path / "full" / "unet" / "diffusion_pytorch_model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert full.keys() == resumed.keys()
    assert all(np.array_equal(full[k].numpy(), resumed[k].numpy()) for k in full)


def test_cancelled_run_writes_nothing(tmp_path, volume_case):
    image_path, label_path = volume_case(".nrrd")
    (tmp_path / "CANCEL").write_text("")
    with pytest.raises(Cancelled):
        run(tmp_path, image_path, label_path, "out", "--cancel-file", tmp_path / "CANCEL")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_an_interrupted_run_with_resume_continues_its_finetune(tmp_path, volume_case):
    image_path, label_path = volume_case(".nrrd")
    args = ["run", "--image", image_path, "--label", label_path, *TRAIN_TINY, "--train-steps", "6",
            *SAMPLE_TINY, "--mask-source", "label", "--erode", "0", *COMMON, "--resume"]
    run_command([*args, "--out", tmp_path / "full"])
    events = []
    cancel_after_four_steps = cancel_after_finetune_steps(events, 4)
    with pytest.raises(Cancelled):
        run_command([*args, "--out", tmp_path / "out"], on_progress=events.append,
                    should_cancel=cancel_after_four_steps)
    assert not (tmp_path / "out").exists()
    assert (tmp_path / ".out.partial" / "model" / "checkpoints" / "step-0000004").is_dir()
    events.clear()
    run_command([*args, "--out", tmp_path / "out"], on_progress=events.append)
    assert [e["step"] for e in events if e.get("stage") == "finetune"] == [4, 5, 6]  # continued
    assert not (tmp_path / ".out.partial").exists()
    assert not (tmp_path / "out" / "model" / "checkpoints").exists()
    for out in ("full", "out"):
        assert len(manifest(tmp_path / out)["samples"]) == 2
    for i in range(2):
        full, resumed = (sitk.GetArrayFromImage(read(tmp_path / out / manifest(tmp_path / out)["samples"][i]["image"]))
                         for out in ("full", "out"))
        assert np.array_equal(full, resumed)


def test_json_progress_protocol_and_exit_codes(tmp_path, volume_case):
    image_path, label_path = volume_case(".nrrd")
    cmd = [sys.executable, "-m", "MedDiffFTLib.cli", "run", "--image", str(image_path), "--label",
           str(label_path), "--out", str(tmp_path / "out"), *TRAIN_TINY, *SAMPLE_TINY,
           "--device", "cpu", "--progress", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    stages = {e["stage"] for e in events if "stage" in e}
    assert stages == {"finetune", "mask generator", "sample"}
    assert all(e["step"] <= e["total"] for e in events if e.get("stage") == "finetune")
    assert events[-1]["event"] == "done" and events[-1]["samples"] == 2
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    error = json.loads(again.stdout.splitlines()[-1])
    assert error["event"] == "error" and "already exists" in error["message"]


def test_transplant_start_and_stochastic_sampler(tmp_path, picture_case):
    image_path, label_path = picture_case
    run(tmp_path, image_path, label_path, "out", "--init", "transplant", "--strength", "0.6",
        "--sampler", "ddpm")
    entries = manifest(tmp_path / "out")["samples"]
    assert [e["init"] for e in entries] == ["transplant", "transplant"]
    assert entries[0]["strength"] == 0.6 and entries[0]["sampler"] == "ddpm"


def test_background_mode_paints_into_a_lesion_free_image(tmp_path, picture_case):
    from PIL import Image

    from MedDiffFTLib.phantom import ultrasound_phantom

    image_path, label_path = picture_case
    healthy = np.clip(ultrasound_phantom(seed=9, size=96)[0].astype(int) + 40, 0, 255).astype(np.uint8)
    Image.fromarray(healthy).save(tmp_path / "healthy.png")
    backgrounds = [tmp_path / "healthy.png", *(tmp_path / f"other_{n}.png" for n in range(2))]
    for path in backgrounds[1:]:
        Image.fromarray(255 - healthy).save(path)
    # the same case twice, 2 samples each: the cycle over 3 backgrounds goes on from case to case
    run(tmp_path, image_path, label_path, "out", "--image", image_path, "--label", label_path,
        *(arg for path in backgrounds for arg in ("--background", path)))
    entries = manifest(tmp_path / "out")["samples"]
    assert [e["background_image"] for e in entries] == [str(backgrounds[n % 3]) for n in range(4)]
    entry = entries[0]
    sample = np.asarray(Image.open(tmp_path / "out" / entry["image"]))
    new = np.asarray(Image.open(tmp_path / "out" / entry["label"])) > 0
    assert sample.ndim == 2 and new.sum() == (np.asarray(Image.open(label_path)) > 0).sum()
    far = seam_weights(new, SEAM) == 0
    assert np.array_equal(sample[far], healthy[far])


def test_a_background_too_small_for_the_lesion_rejects_only_its_samples(tmp_path, picture_case):
    from PIL import Image

    image_path, label_path = picture_case
    Image.fromarray(np.full((8, 8), 90, np.uint8)).save(tmp_path / "small.png")
    Image.fromarray(np.full((96, 96), 90, np.uint8)).save(tmp_path / "large.png")
    run(tmp_path, image_path, label_path, "out", "--background", tmp_path / "small.png",
        "--background", tmp_path / "large.png")
    result = manifest(tmp_path / "out")
    assert [e["background_image"] for e in result["samples"]] == [str(tmp_path / "large.png")]
    assert [(e["seed"], e["background_image"]) for e in result["rejected"]] == [
        (sample_seed(0, read_case(str(image_path), str(label_path)).image, 0), str(tmp_path / "small.png"))]
    assert "does not fit in the background ((1, 8, 8))" in result["rejected"][0]["reason"]


def test_demo_runs_and_says_it_uses_a_phantom(tmp_path):
    events = []
    result = run_command(["demo", "--out", tmp_path / "demo", "--train-steps", "2", "--samples", "1",
                          "--qa", "off", "--device", "cpu"], on_progress=events.append)
    assert (tmp_path / "demo" / "run" / "preview.png").is_file()
    assert result["preview"] == str(tmp_path / "demo" / "run" / "preview.png")
    assert any("phantom" in e.get("message", "") for e in events)


@pytest.mark.parametrize("scale", ["native", "fit"])
def test_both_scales_keep_the_background(tmp_path, picture_case, scale):
    from PIL import Image

    from MedDiffFTLib.slicing import window_around

    image_path, label_path = picture_case
    mask = np.asarray(Image.open(label_path)) > 0
    window = window_around(mask, 32, scale="native")
    assert window.native and window.size % 8 == 0 and window.size > 32  # no resampling
    assert not window_around(mask, 32, scale="fit").native
    run(tmp_path, image_path, label_path, "out", "--scale", scale)
    out = tmp_path / "out"
    assert manifest(out)["model"]["slices"]["scale"] == scale
    source = np.asarray(Image.open(image_path))
    for entry in manifest(out)["samples"]:
        sample = np.asarray(Image.open(out / entry["image"]))
        far = seam_weights(mask, SEAM) == 0
        assert np.array_equal(sample[far], source[far])
        assert not np.array_equal(sample[mask], source[mask])
