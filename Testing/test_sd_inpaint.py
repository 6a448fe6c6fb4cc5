"""The sd-inpaint backbone on a tiny random SD inpainting checkpoint (offline, CPU): LoRA and full
fine-tuning, saving/reloading, the reference recipe, latent caching, refusals, latent-space guided
sampling and a 2-process accelerate run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import COMMON, geometry, make_volume, read, write_volume
from tiny_sd import save_tiny_sd

from MedDiffFTLib.backbone import InpaintRequest, load_model
from MedDiffFTLib.cli import run_command
from MedDiffFTLib.errors import Cancelled, MedDiffFTError
from MedDiffFTLib.finetune import (TrainingWindows, WindowPool, _optimizer, make_backbone,
                                   recipe_defaults, settings_from_options, train)
from MedDiffFTLib.generate import seam_weights
from MedDiffFTLib.progress import Progress
from MedDiffFTLib.sd_inpaint import REFERENCE_SAMPLING_STEPS, SDInpaintBackbone

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd-inpaint")


def sd_tiny(base: Path) -> list:
    return ["--backbone", "sd-inpaint", "--base-model", base, "--resolution", "32", "--train-steps", "3",
            "--batch-size", "2", "--latent-pool", "4", "--learning-rate", "1e-3", "--checkpoint-every", "2",
            "--precision", "fp32", "--qa", "off", "--mask-steps", "0"]


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("case")
    image, label = make_volume()
    return write_volume(image, folder / "image.nrrd"), write_volume(label, folder / "label.nrrd")


def finetune(folder: Path, case, base, name, *extra) -> Path:
    run_command(["finetune", "--image", case[0], "--label", case[1], "--model-out", folder / name,
                 *sd_tiny(base), *COMMON, *extra])
    return folder / name


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory, case, base) -> Path:
    return finetune(tmp_path_factory.mktemp("lora"), case, base, "lora")


def request(batch: int = 2, seed: int = 0) -> InpaintRequest:
    rng = np.random.default_rng(seed)
    background = torch.from_numpy(rng.uniform(-1, 1, (batch, 1, 32, 32)).astype(np.float32))
    region = torch.zeros(batch, 1, 32, 32)
    region[..., 6:22, 8:24] = 1
    lesion = torch.zeros(batch, 1, 32, 32)
    lesion[..., 10:18, 12:20] = 1  # the rest of the region is healed
    return InpaintRequest(background, region, lesion, [torch.Generator().manual_seed(seed + i) for i in range(batch)])


def inpaint(model_dir: Path, steps: int = 3) -> torch.Tensor:
    backbone, _, _ = load_model(model_dir, torch.device("cpu"))
    return backbone.inpaint(request(), sampler="dpmsolver++", num_steps=steps)


def card(model: Path) -> dict:
    return json.loads((model / "meddiffft.json").read_text())


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_finetune_changes_outputs_and_reload_reproduces_them(tmp_path, case, base, lora_model, mode):
    model = lora_model if mode == "lora" else finetune(tmp_path, case, base, mode, "--finetune", mode)
    files = {p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file()}
    if mode == "lora":  # the adapter and conv_in only; the base model is named in the card
        assert {"pytorch_lora_weights.safetensors", "conv_in.safetensors", "sd_inpaint.json"} <= files
        assert not any(f.startswith("unet/") for f in files)
    else:
        assert "unet/diffusion_pytorch_model.safetensors" in files
        assert "pytorch_lora_weights.safetensors" not in files
    assert not any(f.endswith((".bin", ".pt", ".ckpt")) for f in files)
    settings = card(model)["backbone_settings"]
    assert settings["base_model"] == str(base.resolve()) and settings["finetune"] == mode
    assert card(model)["training"]["steps_done"] == 3

    first, again = inpaint(model), inpaint(model)
    assert torch.equal(first, again)  # reload reproduces outputs exactly
    settings = SDInpaintBackbone.from_pretrained(model).settings
    untrained = SDInpaintBackbone(SDInpaintBackbone.load_components(settings), settings, resolution=32,
                                  channels=1)
    before = untrained.inpaint(request(), sampler="dpmsolver++", num_steps=3)
    assert not torch.equal(first, before)  # fine-tuning changed the outputs
    outside = request().region == 0
    assert torch.equal(first[outside], request().background[outside])


def test_lora_adapter_loads_with_diffusers(base, lora_model):
    from diffusers import StableDiffusionInpaintPipeline

    ours, _, _ = load_model(lora_model, torch.device("cpu"))
    pipe = StableDiffusionInpaintPipeline.from_pretrained(base, use_safetensors=True)
    pipe.load_lora_weights(lora_model, weight_name="pytorch_lora_weights.safetensors")
    assert pipe.get_list_adapters()["unet"]
    inputs = torch.randn(1, 9, 4, 4, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    pipe.unet.conv_in.load_state_dict(ours.unet.conv_in.state_dict())
    with torch.no_grad():
        theirs = pipe.unet(inputs, 10, encoder_hidden_states=text).sample
        mine = ours.unet(inputs, 10, encoder_hidden_states=text).sample
        pipe.unet.disable_lora()
        without = pipe.unet(inputs, 10, encoder_hidden_states=text).sample
    assert torch.equal(theirs, mine) and not torch.equal(theirs, without)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_resumed_lora_run_ends_with_the_same_adapter(tmp_path, case, base, precision):
    """fp16 also scales the loss (its gradients underflow otherwise); the scale is resumed too."""
    from safetensors.torch import load_file

    args = ["finetune", "--image", case[0], "--label", case[1], *sd_tiny(base), "--train-steps", "4",
            "--precision", precision, *COMMON]
    run_command([*args, "--model-out", tmp_path / "full"])
    events = []
    with pytest.raises(Cancelled):
        run_command([*args, "--model-out", tmp_path / "resumed"], on_progress=events.append,
                    should_cancel=lambda: sum(e.get("stage") == "finetune" for e in events) >= 2)
    saved = json.loads((tmp_path / "resumed" / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert bool(saved["grad_scaler"]) == (precision == "fp16")  # the checkpoint holds the loss scale
    run_command([*args, "--model-out", tmp_path / "resumed", "--resume"])
    for name in ("pytorch_lora_weights.safetensors", "conv_in.safetensors"):
        full, resumed = (load_file(str(tmp_path / run / name)) for run in ("full", "resumed"))
        assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    scales = [card(tmp_path / run)["training"]["loss_scale"] for run in ("full", "resumed")]
    if precision == "bf16":
        assert scales == [None, None]
    else:  # the scaler ran (a disabled one has scale 1) and the resumed run ends with the same scale
        assert scales[0] == scales[1] > 1.0


def test_reference_recipe_uses_the_reference_hyperparameters(tmp_path, case, base):
    preset = recipe_defaults("sd-inpaint", "reference")
    assert (preset["train_steps"], preset["resolution"], preset["batch_size"], preset["grad_accum"]) == (500, 512, 1, 2)
    assert (preset["learning_rate"], preset["warmup_steps"], preset["weight_decay"]) == (3e-6, 0, 1e-2)
    assert (preset["finetune"], preset["precision"], preset["prompt"], preset["lesion_weight"]) == \
        ("full", "fp32", "a photo of hta", 0.0)
    assert (preset["guidance_scale"], REFERENCE_SAMPLING_STEPS) == (7.5, 50)
    # explicit options still win (a short run at a small size); the rest is the reference's
    model = finetune(tmp_path, case, base, "ref", "--recipe", "reference", "--learning-rate", "3e-6",
                     "--batch-size", "1", "--latent-pool", "0")
    training = card(model)["training"]
    assert training["recipe"] == "reference" and training["steps"] == 3
    assert (training["learning_rate"], training["weight_decay"], training["grad_accum"], training["ema_decay"],
            training["warmup_steps"], training["lesion_weight"], training["curriculum"]) == \
        (3e-6, 1e-2, 2, 0.0, 0, 0.0, [1.0, 0.0, 0.0])
    sd = training["sd"]
    assert (sd["finetune"], sd["precision"], sd["gradient_checkpointing"], sd["prompt"], sd["heal_prompt"],
            sd["mask_downsample"], sd["latents"], sd["prompt_padding"]) == \
        ("full", "fp32", False, "a photo of hta", "a photo of hta", "nearest", "sample", "longest")
    _, settings = settings_from_options({**_options(base), "recipe": "reference"})
    optimizer = _optimizer([torch.nn.Parameter(torch.zeros(1))], settings)
    group = optimizer.param_groups[0]
    assert type(optimizer) is torch.optim.AdamW
    assert (group["lr"], group["betas"], group["weight_decay"], group["eps"]) == (3e-6, (0.9, 0.999), 1e-2, 1e-8)
    backbone, _, _ = load_model(model, torch.device("cpu"))
    out = backbone.inpaint(request(batch=1), sampler="dpmsolver++", num_steps=3)  # the plain pipeline call
    outside = request(batch=1).region == 0
    assert torch.equal(out[outside], request(batch=1).background[outside])
    run_command(["sample", "--model", model, "--image", case[0], "--label", case[1], "--out", tmp_path / "out",
                 "--samples", "1", "--sampling-steps", "3", "--qa", "off", "--mask-source", "label", *COMMON])
    entry = json.loads((tmp_path / "out" / "manifest.json").read_text())["samples"][0]
    assert (entry["sampler"], entry["sampling_steps"]) == ("ddim", 50)  # what ran, not the ignored options


def _options(base: Path) -> dict:
    return {"backbone": "sd-inpaint", "base_model": str(base), "resolution": 32, "axis": "auto",
            "intensity": "auto", "roi": "auto", "context": 0.5, "scale": "native", "seed": 0,
            "checkpoint_every": 100, "train_steps": 3, "batch_size": 2, "latent_pool": 4,
            "precision": "fp32", "pretrain_steps": None}


def test_cached_latents_give_the_same_losses_as_encoding_every_step(case, base):
    from MedDiffFTLib.caseio import read_case

    slices, settings = settings_from_options(_options(base))
    windows = TrainingWindows([read_case(*case)], [], slices, settings.curriculum)
    losses = []
    for cached in (True, False):
        settings.cache_latents = cached
        torch.manual_seed(0)
        backbone = make_backbone(settings, slices, windows.channels, torch.device("cpu"))
        stats = train(backbone, windows, settings, device=torch.device("cpu"), checkpoint_dir=None,
                      progress=Progress("none"))
        losses.append(stats["losses"])
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    pool = WindowPool(backbone, windows, settings, torch.device("cpu"), Progress("none"))
    assert set(pool.items[0]) == {"image", "region", "lesion", "context"}  # uncached: pixels, encoded per use


def test_refuses_unsafe_or_unfit_checkpoints(tmp_path, case, base):
    image, label = case

    def attempt(model_dir, *extra):
        argv = ["finetune", "--image", image, "--label", label, "--model-out", tmp_path / "m",
                *sd_tiny(model_dir), *COMMON, *extra]
        run_command(argv)

    with pytest.raises(MedDiffFTError, match="its UNet takes 4 input channels; sd-inpaint needs an inpainting"):
        attempt(save_tiny_sd(tmp_path / "text2img", in_channels=4))
    pickled = tmp_path / "pickled"
    shutil.copytree(base, pickled)
    (pickled / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (pickled / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(MedDiffFTError, match=r"unet/ holds only pickle weights \(diffusion_pytorch_model.bin\)"):
        attempt(pickled)
    (tmp_path / "model.ckpt").write_bytes(b"never unpickled")
    with pytest.raises(MedDiffFTError, match="model.ckpt is pickle weights"):
        attempt(tmp_path / "model.ckpt")
    custom = tmp_path / "custom"
    shutil.copytree(base, custom)
    index = json.loads((custom / "model_index.json").read_text())
    index["unet"] = ["my_unet", "MyUNet"]
    (custom / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(MedDiffFTError, match=r"needs custom code \(unet; trust_remote_code\)"):
        attempt(custom)
    with pytest.raises(MedDiffFTError, match="could not get it from the Hugging Face hub"):
        attempt("nobody-here/no-such-model")  # tests run with HF_HUB_OFFLINE=1
    with pytest.raises(MedDiffFTError, match="needs --base-model DIR_OR_HUB_ID"):
        run_command(["finetune", "--image", image, "--label", label, "--model-out", tmp_path / "m",
                     "--backbone", "sd-inpaint", *COMMON])
    with pytest.raises(MedDiffFTError, match="--resolution 40: this checkpoint needs a multiple of 16"):
        attempt(base, "--resolution", "40")
    with pytest.raises(MedDiffFTError, match="--recipe reference is for the sd-inpaint backbone"):
        run_command(["finetune", "--image", image, "--label", label, "--model-out", tmp_path / "m",
                     "--recipe", "reference", *COMMON])
    assert not (tmp_path / "m").exists()


def test_sample_keeps_the_background_and_paints_in_latent_space(tmp_path, case, lora_model):
    image, label = case
    run_command(["sample", "--model", lora_model, "--image", image, "--label", label, "--out", tmp_path / "out",
                 "--samples", "1", "--sampling-steps", "3", "--guidance-scale", "2", "--seam", "2", "--qa", "off",
                 "--mask-source", "label",                 *COMMON])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    entry = manifest["samples"][0]
    assert manifest["model"]["backbone"] == "sd-inpaint"
    source, sample = read(image), read(tmp_path / "out" / entry["image"])
    assert geometry(sample) == geometry(source)
    original, painted = sitk.GetArrayFromImage(source), sitk.GetArrayFromImage(sample)
    mask = sitk.GetArrayFromImage(read(label)) > 0
    far = np.stack([seam_weights(plane, 2) == 0 for plane in mask])
    assert np.array_equal(painted[far], original[far]) and not np.array_equal(painted[mask], original[mask])


@pytest.mark.multiprocess
def test_two_process_accelerate_run_on_cpu(tmp_path, case, base):
    """`accelerate launch --multi_gpu --num_processes 2 ... --device cpu`: 2 CPU processes (gloo;
    accelerate's own --cpu launcher starts one process unless MPI is set up). Each draws its own
    batches, the gradients are averaged, only the main process writes the model folder."""
    image, label = case
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "MedDiffFTLib.cli", "finetune",
         "--image", str(image), "--label", str(label), "--model-out", str(tmp_path / "m"),
         *map(str, sd_tiny(base)), *COMMON],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    training = card(tmp_path / "m")["training"]
    assert training["processes"] == 2 and training["steps_done"] == 3
    assert (tmp_path / "m" / "pytorch_lora_weights.safetensors").is_file()
    assert not (tmp_path / "m" / "checkpoints").exists()
