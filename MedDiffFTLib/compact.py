"""The ``compact`` backbone: a pixel-space inpainting diffusion UNet trained from scratch on the
user's slices (no download; runs on a laptop CPU).

Input channels: noisy image (C) + region mask (1) + lesion mask (1) + masked image (C) + context
(2 N C). The lesion channel separates "paint a lesion here" from "heal this as tissue", so a moved
lesion's old place can be healed in the same pass. Unlabeled pretraining data uses 0.5 ("unknown")
in that channel. The context holds the N slices below and the N above the current one along the
slicing axis (``--context-slices N``, default 0: no context channels; see ``generate`` for what
they show); N follows from the UNet's saved ``in_channels``, so a model folder carries it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

from .backbone import Backbone, InpaintRequest
from .errors import MedDiffFTError
from .guidance import GuideSchedule, guided_denoise, make_sampler

MODEL_SIZES = {
    # name: (block_out_channels, layers_per_block, attention at the lowest level, norm groups)
    "tiny": ((16, 32), 1, False, 8),
    "small": ((32, 64, 128), 1, True, 16),
    "base": ((32, 64, 128, 256), 2, True, 16),
}


class CompactBackbone(Backbone):
    """``UNet2DModel`` + DDPM training schedule (cosine betas, epsilon prediction)."""

    kind = "compact"

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler) -> None:
        self.unet = unet
        self.scheduler = scheduler
        self.resolution = int(unet.config.sample_size)
        self.channels = int(unet.config.out_channels)
        extra = int(unet.config.in_channels) - (2 * self.channels + 2)
        if extra < 0 or extra % (2 * self.channels):
            raise MedDiffFTError(f"This compact UNet has {unet.config.in_channels} input channels, which "
                                 f"no --context-slices gives for {self.channels} image channel(s).")
        self.context_slices = extra // (2 * self.channels)

    @classmethod
    def create(cls, *, resolution: int, channels: int, size: str = "small",
               context_slices: int = 0) -> "CompactBackbone":
        if size not in MODEL_SIZES:
            raise MedDiffFTError(f"--model-size {size}: choose one of {', '.join(MODEL_SIZES)}.")
        blocks, layers, attention, groups = MODEL_SIZES[size]
        if resolution % (2 ** (len(blocks) - 1)) or resolution < 16:
            raise MedDiffFTError(f"--resolution {resolution}: use a multiple of "
                                 f"{2 ** (len(blocks) - 1)} of at least 16 (e.g. 64, 96, 128).")
        down = ["DownBlock2D"] * len(blocks)
        up = ["UpBlock2D"] * len(blocks)
        if attention:
            down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
        if context_slices < 0:
            raise MedDiffFTError(f"--context-slices {context_slices}: use 0 (no context) or more.")
        unet = UNet2DModel(sample_size=resolution, in_channels=(2 + 2 * context_slices) * channels + 2,
                           out_channels=channels,
                           block_out_channels=blocks, layers_per_block=layers,
                           down_block_types=tuple(down), up_block_types=tuple(up),
                           norm_num_groups=groups, attention_head_dim=8)
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                  prediction_type="epsilon", clip_sample=False)
        return cls(unet, scheduler)

    @classmethod
    def from_pretrained(cls, directory: Path) -> "CompactBackbone":
        unet = UNet2DModel.from_pretrained(directory / "unet", use_safetensors=True)
        scheduler = DDPMScheduler.from_pretrained(directory / "scheduler")
        return cls(unet.eval(), scheduler)

    def save_pretrained(self, directory: Path) -> None:
        self.unet.save_pretrained(directory / "unet", safe_serialization=True)
        self.scheduler.save_pretrained(directory / "scheduler")

    def to(self, device: torch.device) -> "CompactBackbone":
        self.unet.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def trainable_parameters(self):
        return self.unet.parameters()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.unet.state_dict().items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        self.unet.load_state_dict(state)

    def _context(self, context: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """The context channels (B, 2 N C, R, R); None stands for none (only valid when N = 0)."""
        expected = 2 * self.context_slices * self.channels
        if context is None:
            context = like.new_zeros((like.shape[0], 0, *like.shape[2:]))
        if context.shape[1] != expected:
            raise MedDiffFTError(f"This model was trained with --context-slices {self.context_slices} "
                                 f"({expected} context channels); got {context.shape[1]}.")
        return context.to(like.device, like.dtype)

    def _condition(self, sample: torch.Tensor, region: torch.Tensor, lesion: torch.Tensor,
                   background: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return torch.cat([sample, region, lesion, background * (1.0 - region), context], dim=1)

    def training_loss(self, batch, generator):
        self.unet.train()
        image, region, lesion = batch["image"], batch["region"], batch["lesion"]
        noise = torch.randn(image.shape, generator=generator).to(image.device)
        steps = torch.randint(0, self.scheduler.config.num_train_timesteps, (image.shape[0],),
                              generator=generator).to(image.device)
        noisy = self.scheduler.add_noise(image, noise, steps)
        context = self._context(batch.get("context"), image)
        prediction = self.unet(self._condition(noisy, region, lesion, image, context), steps).sample
        weight = 1.0 + batch["lesion_weight"] * region
        return (weight * (prediction - noise) ** 2).mean()

    @torch.no_grad()
    def inpaint(self, request: InpaintRequest, *, sampler: str, num_steps: int,
                on_step: Callable[[], None] | None = None) -> torch.Tensor:
        self.unet.eval()
        scheduler = make_sampler(sampler, self.scheduler.config)
        background = request.background.to(self.device)
        region = request.region.to(self.device)
        lesion = request.lesion.to(self.device)
        context = self._context(request.context, background)

        def denoise(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            inputs = self._condition(sample, region, lesion, background, context)
            return self.unet(inputs, t.to(self.device).expand(sample.shape[0])).sample

        result = guided_denoise(denoise, scheduler, background, region, num_steps=num_steps,
                                generators=request.generators, guide=GuideSchedule(),
                                init=None if request.init is None else request.init.to(self.device),
                                strength=request.strength, on_step=on_step)
        return result.clamp(-1.0, 1.0)

