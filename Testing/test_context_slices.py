"""--context-slices N: neighbouring slices as extra input channels of the compact backbone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import COMMON, TRAIN_TINY, make_volume, write_volume

from MedDiffFTLib import generate
from MedDiffFTLib.backbone import InpaintRequest, load_model
from MedDiffFTLib.caseio import read_case
from MedDiffFTLib.cli import run_command
from MedDiffFTLib.compact import CompactBackbone
from MedDiffFTLib.errors import MedDiffFTError
from MedDiffFTLib.finetune import SliceSettings, TrainingWindows
from MedDiffFTLib.slicing import context_indices, fit_intensity, slice_stack, to_channels

FAST = [*TRAIN_TINY, "--qa", "off", "--mask-steps", "0", *COMMON]
SAMPLE = ["--samples", "1", "--sampling-steps", "3", "--qa", "off", "--mask-source", "label",
          "--erode", "0", *COMMON]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("n", [0, 1, 2])
def test_input_channels_follow_n(channels, n):
    backbone = CompactBackbone.create(resolution=16, channels=channels, size="tiny", context_slices=n)
    assert backbone.unet.config.in_channels == 2 * channels + 2 + 2 * n * channels  # N = 0: as before
    assert backbone.context_slices == n


def test_context_indices_clamp_and_never_show_the_slice_itself():
    assert context_indices(2, 5, 0) == []
    assert context_indices(2, 5, 2) == [0, 1, 3, 4]
    assert context_indices(0, 5, 2) == [None, None, 1, 2]  # below the first slice: zeros
    assert context_indices(1, 5, 2) == [0, 0, 2, 3]  # clamped: the edge slice replicated
    assert context_indices(4, 5, 1) == [3, None]
    assert context_indices(0, 1, 1) == [None, None]  # a 2D image: zeros


def test_training_windows_hold_the_neighbour_slices(tmp_path):
    count = 5
    image = np.broadcast_to(np.arange(count, dtype=np.int16)[:, None, None], (count, 24, 24)).copy()
    label = np.zeros(image.shape, np.uint8)
    label[1:4, 8:14, 9:15] = 1
    case = read_case(str(write_volume(image, tmp_path / "image.nrrd")),
                     str(write_volume(label, tmp_path / "label.nrrd")))
    # window 0..5 maps slice value i to 0.4 i - 1: never 0, so zero planes are told apart
    slices = SliceSettings(resolution=16, axis="0", intensity="window:2.5,5", context_slices=2)
    windows = TrainingWindows([case], [], slices, (0.6, 0.25, 0.15))
    batch = windows.batch(np.random.default_rng(0), 64, 2.0)
    assert batch["context"].shape == (64, 4, 16, 16)
    seen, hidden = set(), []
    for image_item, region, context in zip(batch["image"], batch["region"][:, 0] > 0, batch["context"]):
        index = int(round((float(image_item.mean()) + 1) / 0.4))
        assert torch.allclose(image_item, torch.full_like(image_item, 0.4 * index - 1), atol=1e-5)
        seen.add(index)
        for plane, pick in zip(context, context_indices(index, count, 2)):
            expected = 0.0 if pick is None else 0.4 * pick - 1
            assert torch.allclose(plane[~region], torch.full_like(plane[~region], expected), atol=1e-5)
            inside = plane[region]  # shown whole (like a generated neighbour) or hidden (not yet)
            hidden.append(bool(expected) and bool(torch.all(inside == 0)))
            assert hidden[-1] or torch.allclose(inside, torch.full_like(inside, expected), atol=1e-5)
    assert {0, 1, 2, 3} <= seen  # lesion slices and an edge slice were drawn
    assert 0.3 < np.mean(hidden) < 0.7  # about half of the neighbour planes hide the region
    without = TrainingWindows([case], [], SliceSettings(resolution=16, axis="0", intensity="window:2.5,5"),
                              (0.6, 0.25, 0.15)).batch(np.random.default_rng(0), 64, 2.0)
    assert without["context"].shape == (64, 0, 16, 16)  # N = 0: no context channels


def test_a_saved_model_with_context_reloads_and_reproduces_its_output(tmp_path):
    torch.manual_seed(0)
    backbone = CompactBackbone.create(resolution=16, channels=1, size="tiny", context_slices=1)
    with torch.no_grad():
        for p in backbone.unet.parameters():  # an untrained UNet's last layer is zero
            p.add_(0.05 * torch.randn_like(p))
    rng = torch.Generator().manual_seed(1)
    background = torch.rand((2, 1, 16, 16), generator=rng) * 2 - 1
    region = torch.zeros((2, 1, 16, 16))
    region[:, :, 4:12, 4:12] = 1

    def paint(model, context):
        request = InpaintRequest(background, region, region, [torch.Generator().manual_seed(s) for s in (3, 4)],
                                 context=context)
        return model.inpaint(request, sampler="dpmsolver++", num_steps=3)

    context = torch.rand((2, 2, 16, 16), generator=rng) * 2 - 1
    first = paint(backbone, context)  # fresh from code: its scheduler config is all defaults
    backbone.save_pretrained(tmp_path / "model")
    CompactBackbone.from_pretrained(tmp_path / "model").save_pretrained(tmp_path / "again")
    reloaded = CompactBackbone.from_pretrained(tmp_path / "again")
    assert reloaded.context_slices == 1 and reloaded.unet.config.in_channels == 6
    assert torch.equal(paint(reloaded, context), first)
    assert not torch.equal(paint(reloaded, -context), first)  # the context reaches the UNet
    with pytest.raises(MedDiffFTError, match="--context-slices 1"):
        paint(reloaded, None)


@pytest.fixture(scope="module")
def volume_paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("context")
    image, label = make_volume(0)
    return write_volume(image, folder / "image.nrrd"), write_volume(label, folder / "label.nrrd")


def test_model_folder_carries_n_and_sampling_sees_generated_neighbours(tmp_path, volume_paths, monkeypatch):
    image_path, label_path = volume_paths
    model = tmp_path / "model"
    run_command(["finetune", "--image", image_path, "--label", label_path, "--model-out", model,
                 "--context-slices", "1", *FAST])
    backbone, card, _ = load_model(model, torch.device("cpu"))
    assert backbone.context_slices == 1 and card["slices"]["context_slices"] == 1
    seen = []  # (slice, {neighbour: that neighbour's model-space plane when slice was painted})
    original = generate.extract_context

    def recording(window, stack, index, context_slices):
        seen.append((index, {t: stack[t].copy() for t in context_indices(index, len(stack), context_slices)
                             if t is not None}))
        return original(window, stack, index, context_slices)

    monkeypatch.setattr(generate, "extract_context", recording)
    requests = []
    paint = CompactBackbone.inpaint

    def inpaint(self, request, **kwargs):
        requests.append(request)
        return paint(self, request, **kwargs)

    monkeypatch.setattr(CompactBackbone, "inpaint", inpaint)
    outputs = []
    for out in ("a", "b"):  # no --context-slices at sampling: the model folder says 1
        run_command(["sample", "--model", model, "--image", image_path, "--label", label_path,
                     "--out", tmp_path / out, *SAMPLE])
        entry = json.loads((tmp_path / out / "manifest.json").read_text())["samples"][0]
        outputs.append(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / out / entry["image"]))))
    assert np.array_equal(outputs[0], outputs[1])  # reproducible
    source = sitk.GetArrayFromImage(sitk.ReadImage(str(image_path)))
    intensity = fit_intensity(source, card["slices"]["intensity"])

    def normalized(volume, t):
        return to_channels(intensity.forward(slice_stack(volume, 0)[t]), 1, spatial_dims=2)

    # lesion on slices 2 and 3; propagate paints slice 3 (the centre of the two) first, then 2
    assert [index for index, _ in seen] == [3, 2, 3, 2]
    for index, planes in seen:
        for t, plane in planes.items():
            generated_before = index == 2 and t == 3
            expected = normalized(outputs[0] if generated_before else source, t)
            assert np.array_equal(plane, expected), (index, t)
    assert not np.array_equal(normalized(outputs[0], 3), normalized(source, 3))
    # what the UNet gets: a neighbour not generated yet has the region zeroed, a generated one not
    first, second = requests[0], requests[1]
    assert first.context.shape == (1, 2, *first.region.shape[-2:])
    assert torch.all(first.context[0, 0][first.region[0, 0] > 0] == 0)  # slice 2, not yet painted
    assert torch.all(first.context[0, 1][first.region[0, 0] > 0] == 0)  # slice 4, background
    assert torch.all(second.context[0, 0][second.region[0, 0] > 0] == 0)  # slice 1, background
    assert torch.any(second.context[0, 1][second.region[0, 0] > 0] != 0)  # slice 3, as generated


def test_init_model_with_another_n_is_refused(tmp_path, volume_paths):
    image_path, label_path = volume_paths
    pretrained = tmp_path / "pretrained"
    run_command(["pretrain", "--unlabeled", image_path, "--model-out", pretrained, *FAST])
    with pytest.raises(MedDiffFTError) as error:
        run_command(["finetune", "--image", image_path, "--label", label_path, "--model-out", tmp_path / "m",
                     "--init-model", pretrained, "--context-slices", "1", *FAST])
    assert str(error.value) == (f"--init-model {pretrained} was trained with --context-slices 0, this "
                                "fine-tune asks for 1: pass --context-slices 0, or pretrain a model "
                                "with --context-slices 1.")


def test_sd_inpaint_refuses_context_slices(tmp_path, volume_paths):
    image_path, label_path = volume_paths
    with pytest.raises(MedDiffFTError) as error:
        run_command(["finetune", "--image", image_path, "--label", label_path, "--model-out", tmp_path / "m",
                     "--backbone", "sd-inpaint", "--base-model", tmp_path / "base", "--context-slices", "2",
                     *COMMON])
    assert str(error.value) == ("--context-slices 2 is for the compact backbone only (--backbone "
                                "sd-inpaint has no context channels): drop --context-slices, or use "
                                "--backbone compact.")
    assert not (tmp_path / "m").exists()


def test_without_the_option_the_model_has_no_context_channels(tmp_path, volume_paths):
    """N = 0 (the default) is today's model: the same UNet input count and no context in the card.
    (Its outputs were checked bit-for-bit against the code before the option when it was added.)"""
    image_path, label_path = volume_paths
    run_command(["run", "--image", image_path, "--label", label_path, "--out", tmp_path / "plain", *FAST, *SAMPLE])
    backbone, card, _ = load_model(tmp_path / "plain" / "model", torch.device("cpu"))
    assert backbone.unet.config.in_channels == 4 and backbone.context_slices == 0
    assert card["slices"]["context_slices"] == 0
