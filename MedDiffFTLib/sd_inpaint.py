"""The ``sd-inpaint`` backbone: a Stable-Diffusion inpainting checkpoint (9-channel UNet: noisy
latents + mask + masked-image latents; VAE; CLIP text encoder) fine-tuned with LoRA or fully.

Model space is the engine's (C channels in [-1, 1]); grey slices are replicated to RGB for the VAE
and averaged back after decoding. The UNet has no lesion channel, so the text prompt carries it:
training regions that hold lesion pixels get the lesion prompt, lesion-free regions the tissue
("heal") prompt. Sampling heals the old lesion's place (region minus new lesion) with the heal
prompt first, then paints the new lesion with the lesion prompt, both under the dynamic guiding
mask in latent space. The ``reference`` recipe reproduces the reference code (full fine-tune,
plain MSE, nearest-downsampled masks, one prompt) and samples with its plain pipeline call.

A LoRA model folder holds the adapter (diffusers ``save_lora_weights`` safetensors, loadable with
``pipe.load_lora_weights``), the trained ``conv_in`` and ``sd_inpaint.json`` naming the base
model, which must still be available when the model is loaded; a full fine-tune holds its UNet.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .backbone import Backbone, InpaintRequest
from .errors import MedDiffFTError
from .guidance import GuideSchedule, guided_denoise, make_sampler

DEFAULT_BASE = "stable-diffusion-v1-5/stable-diffusion-inpainting"
CONFIG = "sd_inpaint.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
CONV_IN = "conv_in.safetensors"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")
COMPONENTS = (*WEIGHT_COMPONENTS, "tokenizer", "scheduler")
# only what the backbone loads: no pickles, no single-file checkpoints, no fp16/EMA variants
HUB_FILES = ["model_index.json", "scheduler/*", "tokenizer/*", "unet/config.json",
             "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
             "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
             "text_encoder/model.safetensors"]
LESION_PROMPT, HEAL_PROMPT = 0, 1


@dataclass
class SDSettings:
    """How the SD backbone is fine-tuned and sampled (saved in ``sd_inpaint.json``)."""

    base_model: str = ""
    finetune: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    precision: str = "auto"
    gradient_checkpointing: bool = True
    attention: str = "sdpa"
    prompt: str = "a photo of hta lesion"
    heal_prompt: str = "a photo of hta tissue"
    negative_prompt: str = ""
    guidance_scale: float = 3.0
    mask_downsample: str = "max"
    latents: str = "mean"
    prompt_padding: str = "max_length"
    recipe: str = "default"


REFERENCE_SD = dict(finetune="full", precision="fp32", gradient_checkpointing=False,
                    prompt="a photo of hta", heal_prompt="a photo of hta", negative_prompt="",
                    guidance_scale=7.5, mask_downsample="nearest", latents="sample",
                    prompt_padding="longest", recipe="reference")
REFERENCE_SAMPLING_STEPS = 50


def resolve_base(name: str) -> Path:
    """A local diffusers folder, or a hub id (downloaded, safetensors only) when the user names one."""
    if not name:
        raise MedDiffFTError(f"--backbone sd-inpaint needs --base-model DIR_OR_HUB_ID, e.g. {DEFAULT_BASE} "
                             "(CreativeML OpenRAIL-M licence) or a local copy of it.")
    path = Path(name).expanduser()
    if path.is_file():
        kind = "pickle weights" if path.suffix in PICKLE_SUFFIXES else "a single file"
        raise MedDiffFTError(f"--base-model {name} is {kind}; MedDiffFT loads a diffusers folder with "
                             "safetensors weights (model_index.json, unet/, vae/, text_encoder/, ...).")
    if path.exists():
        return path.resolve()
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise MedDiffFTError(f"--base-model {name}: no such folder, and not a hub id like {DEFAULT_BASE}.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_FILES))
    except Exception as exc:  # offline, unknown repo, gated licence: all mean "not available here"
        raise MedDiffFTError(f"--base-model {name}: could not get it from the Hugging Face hub "
                             f"({type(exc).__name__}: {exc}); download it where the hub is reachable "
                             "and pass the local folder.") from exc


def check_base(folder: Path, name: str) -> None:
    """Refuse what the backbone cannot load safely: custom code, pickle-only weights, a UNet that
    is not a 9-channel inpainting UNet."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise MedDiffFTError(f"--base-model {name} is not a diffusers pipeline folder (no model_index.json).")
    spec = json.loads(index.read_text())
    custom = [key for key, value in spec.items() if isinstance(value, list) and value
              and value[0] not in (None, "diffusers", "transformers")]
    if custom or isinstance(spec.get("_class_name"), list) or any(folder.rglob("*.py")):
        raise MedDiffFTError(f"--base-model {name} needs custom code ({', '.join(custom) or 'python files'}; "
                             "trust_remote_code), which MedDiffFT never runs: use a standard diffusers "
                             "StableDiffusionInpaintPipeline checkpoint.")
    for component in COMPONENTS:
        if not (folder / component).is_dir():
            raise MedDiffFTError(f"--base-model {name} has no {component}/ folder: it must be a full "
                                 "StableDiffusionInpaintPipeline checkpoint.")
    for component in WEIGHT_COMPONENTS:
        files = [p.name for p in (folder / component).iterdir()]
        if not any(f.endswith(".safetensors") for f in files):
            pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
            what = f"only pickle weights ({', '.join(sorted(pickles))})" if pickles else "no weights"
            raise MedDiffFTError(f"--base-model {name}: {component}/ holds {what}; MedDiffFT loads "
                                 "safetensors only (never unpickles): convert the checkpoint with "
                                 "save_pretrained(..., safe_serialization=True) or get its safetensors files.")
    channels = json.loads((folder / "unet" / "config.json").read_text()).get("in_channels")
    if channels != 9:
        raise MedDiffFTError(f"--base-model {name}: its UNet takes {channels} input channels; sd-inpaint "
                             "needs an inpainting checkpoint (9 channels: latents, mask, masked-image "
                             f"latents), e.g. {DEFAULT_BASE}.")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = fp32): ``auto`` = bf16 on GPUs and CPUs that support it."""
    if precision == "fp32":
        return None
    if precision in ("bf16", "fp16"):
        return torch.bfloat16 if precision == "bf16" else torch.float16
    if precision != "auto":
        raise MedDiffFTError(f"--precision {precision}: use auto, fp32, bf16 or fp16.")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


class SDInpaintBackbone(Backbone):
    """A diffusers SD inpainting pipeline's parts; LoRA or full fine-tuning of the UNet."""

    kind = "sd-inpaint"

    def __init__(self, components: dict, settings: SDSettings, *, resolution: int, channels: int) -> None:
        from diffusers import DDPMScheduler

        self.unet = components["unet"]
        self.vae = components["vae"].eval().requires_grad_(False)
        self.text_encoder = components["text_encoder"].eval().requires_grad_(False)
        self.tokenizer = components["tokenizer"]
        self.scheduler = DDPMScheduler.from_config(components["scheduler"].config)
        self.settings = settings
        self.resolution = resolution
        self.channels = channels
        self.device = torch.device("cpu")
        self.latent_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.scaling = float(self.vae.config.scaling_factor)
        self._embeddings: dict[tuple[str, str], torch.Tensor] = {}
        multiple = self.latent_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if resolution % multiple:
            raise MedDiffFTError(f"--resolution {resolution}: this checkpoint needs a multiple of {multiple} "
                                 f"px (e.g. {4 * multiple} or {8 * multiple}).")
        if settings.attention not in ("sdpa", "classic"):
            raise MedDiffFTError(f"--attention {settings.attention}: use sdpa or classic.")
        if settings.attention == "classic":
            from diffusers.models.attention_processor import AttnProcessor

            self.unet.set_attn_processor(AttnProcessor())

    # -- construction, saving, loading ---------------------------------------------------------

    @staticmethod
    def load_components(settings: SDSettings, unet_dtype: torch.dtype | None = None) -> dict:
        """The base model's parts (the UNet in ``unet_dtype``, default fp32)."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        folder = resolve_base(settings.base_model)
        check_base(folder, settings.base_model)
        return {"unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True,
                                                             torch_dtype=unet_dtype or torch.float32),
                "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True),
                "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder",
                                                              use_safetensors=True),
                "tokenizer": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
                "scheduler": DDPMScheduler.from_pretrained(folder, subfolder="scheduler")}

    @classmethod
    def create(cls, settings: SDSettings, *, resolution: int, channels: int, device: torch.device,
               components: dict | None = None) -> "SDInpaintBackbone":
        """A backbone on ``device`` ready to fine-tune (``components`` default: loaded from
        ``base_model``; a LoRA base UNet directly in the autocast dtype, it stays frozen)."""
        if settings.base_model and Path(settings.base_model).expanduser().is_dir():  # recorded absolute
            settings = replace(settings, base_model=str(Path(settings.base_model).expanduser().resolve()))
        frozen_dtype = autocast_dtype(settings.precision, torch.device(device)) if settings.finetune == "lora" else None
        backbone = cls(components or cls.load_components(settings, frozen_dtype), settings,
                       resolution=resolution, channels=channels).to(device)
        backbone.make_trainable()
        return backbone

    def make_trainable(self) -> None:
        """LoRA: adapters on the attention projections plus ``conv_in`` (it reads the mask
        channels); full: the whole UNet. Frozen weights are kept in the autocast dtype."""
        settings = self.settings
        if settings.finetune == "full":
            self.unet.requires_grad_(True)
        elif settings.finetune == "lora":
            from peft import LoraConfig

            self.unet.requires_grad_(False)
            dtype = autocast_dtype(settings.precision, self.device)
            if dtype is not None:
                self.unet.to(dtype=dtype)
            self.unet.add_adapter(LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha,
                                             target_modules=list(settings.lora_targets),
                                             init_lora_weights="gaussian"))
            self.unet.conv_in.requires_grad_(True)
            for parameter in self.unet.parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.float()
        else:
            raise MedDiffFTError(f"--finetune {settings.finetune}: use lora or full.")
        if settings.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()

    def pipeline(self, scheduler=None):
        """The parts as a diffusers ``StableDiffusionInpaintPipeline`` (no safety checker)."""
        from diffusers import StableDiffusionInpaintPipeline

        return StableDiffusionInpaintPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=scheduler or self.scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)

    def describe(self) -> dict:
        return {"base_model": self.settings.base_model, "finetune": self.settings.finetune,
                "recipe": self.settings.recipe}

    def needs_loss_scaling(self) -> bool:
        return autocast_dtype(self.settings.precision, self.device) == torch.float16

    def sampling_used(self, sampler: str, num_steps: int) -> dict:
        if self.settings.recipe == "reference":
            return {"sampler": "ddim", "sampling_steps": REFERENCE_SAMPLING_STEPS}
        return super().sampling_used(sampler, num_steps)

    def save_pretrained(self, directory: Path) -> None:
        if self.settings.finetune == "lora":
            from diffusers import StableDiffusionInpaintPipeline
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
            StableDiffusionInpaintPipeline.save_lora_weights(directory, unet_lora_layers=layers,
                                                             weight_name=LORA_WEIGHTS, safe_serialization=True)
            save_file({k: v.detach().contiguous().cpu() for k, v in self.unet.conv_in.state_dict().items()},
                      str(directory / CONV_IN))
        else:
            self.unet.save_pretrained(directory / "unet", safe_serialization=True)
        config = {"settings": asdict(self.settings), "resolution": self.resolution, "channels": self.channels}
        (directory / CONFIG).write_text(json.dumps(config, indent=2))

    @classmethod
    def from_pretrained(cls, directory: Path) -> "SDInpaintBackbone":
        from diffusers import UNet2DConditionModel

        config = json.loads((directory / CONFIG).read_text())
        settings = SDSettings(**{**config["settings"], "lora_targets": tuple(config["settings"]["lora_targets"])})
        components = cls.load_components(settings)
        if settings.finetune == "full":
            components["unet"] = UNet2DConditionModel.from_pretrained(directory / "unet", use_safetensors=True)
        backbone = cls(components, settings, resolution=config["resolution"], channels=config["channels"])
        if settings.finetune == "lora":
            backbone.pipeline().load_lora_weights(directory, weight_name=LORA_WEIGHTS)
            backbone.unet.conv_in.load_state_dict(load_file(str(directory / CONV_IN)))
        backbone.unet.eval().requires_grad_(False)
        return backbone

    def to(self, device: torch.device) -> "SDInpaintBackbone":
        """Move to ``device``; a loaded (frozen) UNet is also cast to the autocast dtype."""
        self.device = torch.device(device)
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(self.device)
        dtype = autocast_dtype(self.settings.precision, self.device)
        if dtype is not None and not self.trainable_parameters():
            self.unet.to(dtype=dtype)
        self._embeddings.clear()
        return self

    def trainable_parameters(self):
        return [p for p in self.unet.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.unet.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        unexpected = self.unet.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise MedDiffFTError(f"Checkpoint does not fit this model ({unexpected[0]}, ...): start again with --overwrite.")

    # -- shared pieces ---------------------------------------------------------------------------

    def _autocast(self):
        dtype = autocast_dtype(self.settings.precision, self.device)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def embeddings(self, prompt: str, padding: str = "max_length") -> torch.Tensor:
        """CLIP text embeddings (1, L, D), computed once per prompt."""
        key = (prompt, padding)
        if key not in self._embeddings:
            ids = self.tokenizer(prompt, padding=padding, max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(self.device)
            with torch.no_grad():
                self._embeddings[key] = self.text_encoder(ids)[0]
        return self._embeddings[key]

    def _rgb(self, image: torch.Tensor) -> torch.Tensor:
        return image.expand(-1, 3, -1, -1) if image.shape[1] == 1 else image

    @torch.no_grad()
    def _encode(self, rgb: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        distribution = self.vae.encode(rgb).latent_dist
        if self.settings.latents == "sample" and generator is not None:
            noise = torch.randn(distribution.mean.shape, generator=generator).to(rgb.device)
            return (distribution.mean + distribution.std * noise) * self.scaling
        return distribution.mean * self.scaling

    def _mask_latent(self, region: torch.Tensor) -> torch.Tensor:
        """Max-pooled (small lesions survive) or, for the reference recipe, nearest-downsampled."""
        if self.settings.mask_downsample == "nearest":
            size = region.shape[-1] // self.latent_factor
            return F.interpolate((region > 0.5).float(), size=(size, size), mode="nearest")
        return F.max_pool2d((region > 0.5).float(), self.latent_factor)

    # -- training --------------------------------------------------------------------------------

    def encode_batch(self, batch: dict[str, torch.Tensor],
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Pixel batch -> latents, masked-image latents, latent mask and prompt index per item."""
        image = self._rgb(batch["image"].to(self.device))
        region = batch["region"].to(self.device)
        lesion = batch["lesion"].to(self.device)
        has_lesion = (lesion * region).flatten(1).amax(dim=1) > 0
        return {"latents": self._encode(image, generator),
                "masked_latents": self._encode(image * (region < 0.5), generator),
                "mask": self._mask_latent(region),
                "prompt": torch.where(has_lesion, LESION_PROMPT, HEAL_PROMPT).to(torch.long)}

    def training_loss(self, batch, generator):
        self.unet.train()
        if "latents" not in batch:
            batch = {**batch, **self.encode_batch(batch, generator)}
        latents = batch["latents"]
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        steps = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator).to(self.device)
        noisy = self.scheduler.add_noise(latents, noise, steps)
        table = torch.cat([self.embeddings(p, self.settings.prompt_padding)
                           for p in (self.settings.prompt, self.settings.heal_prompt)])
        inputs = torch.cat([noisy, batch["mask"], batch["masked_latents"]], dim=1)
        with self._autocast():
            prediction = self.unet(inputs, steps, encoder_hidden_states=table[batch["prompt"]]).sample.float()
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, steps)
        else:
            target = noise
        weight = 1.0 + batch["lesion_weight"] * batch["mask"]
        return (weight * (prediction - target) ** 2).mean()

    # -- sampling --------------------------------------------------------------------------------

    @torch.no_grad()
    def inpaint(self, request: InpaintRequest, *, sampler: str, num_steps: int,
                on_step: Callable[[], None] | None = None) -> torch.Tensor:
        self.unet.eval()
        background = request.background.to(self.device)
        region = (request.region.to(self.device) > 0.5).float()
        lesion = (request.lesion.to(self.device) > 0.5).float() * region
        prompt = request.prompt or self.settings.prompt
        negative = self.settings.negative_prompt if request.negative_prompt is None else request.negative_prompt
        scale = self.settings.guidance_scale if request.guidance_scale is None else request.guidance_scale
        if self.settings.recipe == "reference":
            return self._reference_inpaint(background, region, prompt, negative, scale, request.generators)
        heal = region * (1.0 - lesion)
        result = background
        passes = [(heal, self.settings.heal_prompt, None), (lesion, prompt, request.init)]
        for mask, text, init in passes:
            if mask.any():
                result = self._guided_pass(result, mask, text, negative, scale, request, init,
                                           sampler=sampler, num_steps=num_steps, on_step=on_step)
        return result

    def _guided_pass(self, background, region, prompt, negative, scale, request, init, *,
                     sampler, num_steps, on_step):
        """One latent-space pass under the dynamic guiding mask; pixels outside ``region`` are
        the background's exactly."""
        rgb = self._rgb(background)
        known = self._encode(rgb)
        masked = self._encode(rgb * (1.0 - region))
        mask = self._mask_latent(region)
        batch = background.shape[0]
        condition = self.embeddings(prompt).expand(batch, -1, -1)
        if scale != 1.0:
            condition = torch.cat([self.embeddings(negative).expand(batch, -1, -1), condition])

        def denoise(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            inputs = torch.cat([sample, mask, masked], dim=1)
            if scale != 1.0:
                inputs = torch.cat([inputs, inputs])
            with self._autocast():
                output = self.unet(inputs, t.to(self.device), encoder_hidden_states=condition).sample.float()
            if scale == 1.0:
                return output
            unconditional, conditional = output.chunk(2)
            return unconditional + scale * (conditional - unconditional)

        scheduler = make_sampler(sampler, self.scheduler.config)
        latents = guided_denoise(denoise, scheduler, known, mask, num_steps=num_steps,
                                 generators=request.generators, guide=GuideSchedule(),
                                 init=None if init is None else self._encode(self._rgb(init.to(self.device))),
                                 strength=request.strength, on_step=on_step)
        decoded = self.vae.decode(latents / self.scaling).sample.clamp(-1.0, 1.0)
        return region * self._model_space(decoded) + (1.0 - region) * background

    def _model_space(self, rgb: torch.Tensor) -> torch.Tensor:
        return rgb.mean(dim=1, keepdim=True) if self.channels == 1 else rgb

    def _reference_inpaint(self, background, region, prompt, negative, scale, generators):
        """The reference code's sampling: the plain pipeline call (50 DDIM steps, no per-step
        blending); only the result's region is kept."""
        from diffusers import DDIMScheduler

        pipe = self.pipeline(DDIMScheduler.from_config(self.scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        batch = background.shape[0]
        images = pipe(prompt=[prompt] * batch, negative_prompt=[negative] * batch if negative else None,
                      image=(self._rgb(background) + 1.0) / 2.0, mask_image=region,
                      height=self.resolution, width=self.resolution,
                      num_inference_steps=REFERENCE_SAMPLING_STEPS, guidance_scale=scale,
                      generator=list(generators), output_type="pt").images
        generated = self._model_space(images.to(self.device) * 2.0 - 1.0)
        return region * generated + (1.0 - region) * background
