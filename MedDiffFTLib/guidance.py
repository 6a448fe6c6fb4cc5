"""Guided sampling with the dynamic adaptive guiding mask (method.md section 5).

At every denoising step the model's estimate is kept inside a soft guide mask m_t and the
forward-noised background is re-imposed outside it:
    z_{t-1} = m_t * step(z_t) + (1 - m_t) * add_noise(background, noise_b, t-1).
"Dynamic": m_t is dilated early (high noise) and shrinks to the exact region late. "Adaptive": the
dilation radius scales with the region's size and the border is feathered. Works in pixel space
(compact backbone) and latent space (Stable Diffusion) alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, SchedulerMixin
from scipy import ndimage

from .errors import MedDiffFTError

SAMPLERS = ("dpmsolver++", "sde-dpmsolver++", "ddpm")


def make_sampler(name: str, training_scheduler_config: dict) -> SchedulerMixin:
    """A sampling scheduler from the training scheduler's config: ``dpmsolver++`` (deterministic,
    default), ``sde-dpmsolver++`` or ``ddpm`` (ancestral; both stochastic). Timesteps are spaced
    "leading", as every saved model has sampled (and every measurement in README used), so a model
    fresh from training samples exactly like its reload: a config made in code marks its values
    as defaults, which diffusers replaces by the sampler's own ("linspace" for DPM-Solver)."""
    if name == "ddpm":
        return DDPMScheduler.from_config(training_scheduler_config, timestep_spacing="leading")
    if name in ("dpmsolver++", "sde-dpmsolver++"):
        return DPMSolverMultistepScheduler.from_config(training_scheduler_config, algorithm_type=name,
                                                       solver_order=2, timestep_spacing="leading")
    raise MedDiffFTError(f"--sampler {name}: choose one of {', '.join(SAMPLERS)}.")


@dataclass(frozen=True)
class GuideSchedule:
    """Shape of the dynamic guide mask: the early dilation is ``dilation`` x sqrt(region area)
    (clamped to ``max_dilation`` x the side), shrinking linearly to zero at ``exact_from`` of the
    way through sampling; the feather width equals the current dilation."""

    dilation: float = 0.15
    max_dilation: float = 0.08
    exact_from: float = 0.7

    def masks(self, region: torch.Tensor, num_steps: int) -> list[torch.Tensor]:
        """Per-step soft masks (B, 1, H, W) for a binary region (B, 1, H, W)."""
        region_np = region.detach().cpu().numpy() > 0.5
        distances = np.stack([ndimage.distance_transform_edt(~r[0])[None] for r in region_np])
        side = region.shape[-1]
        areas = region_np.reshape(len(region_np), -1).sum(axis=1)
        radii = np.minimum(self.dilation * np.sqrt(areas), self.max_dilation * side)
        masks = []
        for i in range(num_steps):
            fraction = max(0.0, 1.0 - i / max(1.0, self.exact_from * num_steps))
            r = (radii * fraction)[:, None, None, None]
            feather = np.maximum(r, 1e-6)
            soft = np.clip(1.0 - (distances - r) / feather, 0.0, 1.0)
            soft[distances == 0] = 1.0
            masks.append(torch.from_numpy(soft.astype(np.float32)).to(region.device))
        return masks


def seeded_noise(shape: tuple[int, ...], generators: list[torch.Generator], device) -> torch.Tensor:
    """Standard normal noise, row b drawn from ``generators[b]`` (one seed per sample)."""
    return torch.stack([torch.randn(shape[1:], generator=g) for g in generators]).to(device)


def guided_denoise(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler: SchedulerMixin,
    background: torch.Tensor,
    region: torch.Tensor,
    *,
    num_steps: int,
    generators: list[torch.Generator],
    guide: GuideSchedule = GuideSchedule(),
    init: torch.Tensor | None = None,
    strength: float = 1.0,
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Denoise under the dynamic guiding mask.

    Args:
        denoise: ``(sample, t) -> model output`` (conditioning already bound).
        background: clean background (B, C, H, W) in model space.
        region: binary region to generate (B, 1, H, W).
        init: optional start image (transplant start); noised to ``strength`` and denoised.
        strength: fraction of the schedule to run from ``init`` (1.0 = from pure noise).
    Returns:
        The clean sample (B, C, H, W); outside the final (exact) region it equals ``background``.
    """
    scheduler.set_timesteps(num_steps, device=background.device)
    timesteps = scheduler.timesteps
    start = 0
    noise = seeded_noise(tuple(background.shape), generators, background.device)
    noise_bg = seeded_noise(tuple(background.shape), generators, background.device)
    if init is None:
        sample = noise * scheduler.init_noise_sigma
    else:
        if not 0.0 < strength <= 1.0:
            raise MedDiffFTError(f"--strength {strength}: use a value in (0, 1].")
        start = min(num_steps - 1, int(round(num_steps * (1.0 - strength))))
        sample = scheduler.add_noise(init, noise, timesteps[start:start + 1])
    run = timesteps[start:]
    masks = guide.masks(region, len(run))
    step_generator = generators[0]
    for i, t in enumerate(run):
        model_input = scheduler.scale_model_input(sample, t)
        output = denoise(model_input, t)
        stepped = scheduler.step(output, t, sample, generator=step_generator).prev_sample
        if i + 1 < len(run):
            known = scheduler.add_noise(background, noise_bg, run[i + 1:i + 2])
        else:
            known = background
        sample = masks[i] * stepped + (1.0 - masks[i]) * known
        if on_step is not None:
            on_step()
    return sample
