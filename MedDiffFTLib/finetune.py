"""Fine-tuning: training windows with a mask curriculum, and a resumable training loop.

Every batch is a pure function of (seed, step, data), so a run resumed from a checkpoint ends with
exactly the weights of an uninterrupted run. Checkpoints (weights, optimizer, EMA) are
safetensors + JSON: nothing is unpickled. Under ``accelerate launch`` each process draws its own
batches and the gradients are averaged across processes (data parallel); only the main process
writes checkpoints and the model folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from diffusers.training_utils import EMAModel
from scipy import ndimage
from safetensors.torch import load_file, save_file

from .backbone import Backbone, load_model, save_model
from .caseio import Case
from .compact import CompactBackbone
from .errors import MedDiffFTError
from .masks import dilate, random_blob
from .progress import Progress
from .sd_inpaint import REFERENCE_SD, SDInpaintBackbone, SDSettings
from .slicing import (Window, choose_axis, extract_context, fit_intensity, slice_stack, to_channels,
                      window_around)

UNKNOWN_LESION = 0.5  # lesion channel value for unlabeled data
POOL_KEY = 2**31 - 1  # seeds the fixed window pool apart from the per-step draws


@dataclass
class SliceSettings:
    """How cases become model-space windows; saved in the model card and reused for sampling.
    ``context_slices`` N: neighbouring slices (N below, N above) as extra model inputs
    (compact backbone; see ``slicing.context_indices``)."""

    resolution: int = 64
    axis: str = "auto"
    intensity: str = "auto"
    roi: str = "auto"
    context: float = 0.5
    scale: str = "native"
    context_slices: int = 0


@dataclass
class TrainSettings:
    """The fine-tuning recipe. ``minutes`` (when set) stops training early at a time budget.
    ``latent_pool`` > 0 trains on a fixed pool of that many drawn windows (so a backbone's
    ``encode_batch`` runs once per window when ``cache_latents``); 0 draws fresh windows every
    step. ``ema_decay`` 0 keeps no EMA; ``sd`` holds the sd-inpaint backbone's settings."""

    steps: int = 600
    minutes: float | None = None
    pretrain_steps: int = 0
    batch_size: int = 8
    learning_rate: float = 2e-4
    warmup_steps: int = 50
    lesion_weight: float = 2.0
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 200
    model_size: str = "small"
    curriculum: tuple[float, float, float] = field(default=(0.6, 0.25, 0.15))
    backbone: str = "compact"
    recipe: str = "default"
    grad_accum: int = 1
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    latent_pool: int = 0
    cache_latents: bool = True
    sd: SDSettings | None = None


# Per backbone and recipe: defaults of the options a user may still set explicitly. The
# reference recipe is the reference code's (method.md section 2): full UNet, lr 3e-6 constant,
# AdamW (0.9, 0.999, wd 1e-2, eps 1e-8), clip 1.0, batch 1 x accumulation 2, 500 steps, 512 px,
# fp32, exact masks, plain MSE over the whole latent, no EMA.
RECIPES = {
    ("compact", "default"): {},
    ("sd-inpaint", "default"): dict(resolution=512, batch_size=2, learning_rate=1e-4, warmup_steps=20,
                                    ema_decay=0.0, weight_decay=1e-2, latent_pool=64),
    ("sd-inpaint", "reference"): dict(resolution=512, train_steps=500, batch_size=1, grad_accum=2,
                                      learning_rate=3e-6, warmup_steps=0, lesion_weight=0.0, ema_decay=0.0,
                                      weight_decay=1e-2, latent_pool=0, curriculum=(1.0, 0.0, 0.0),
                                      **REFERENCE_SD),
}
OPTION_DEFAULTS = dict(resolution=64, train_steps=600, batch_size=8, learning_rate=2e-4, lesion_weight=2.0,
                       grad_accum=1, latent_pool=0)


def recipe_defaults(backbone: str, recipe: str | None) -> dict:
    """Defaults of the training options (CLI names with underscores) for a backbone and recipe."""
    if (backbone, recipe or "default") not in RECIPES:
        raise MedDiffFTError(f"--recipe {recipe} is for the sd-inpaint backbone (the reference code's "
                             "Stable Diffusion recipe): add --backbone sd-inpaint --base-model DIR.")
    return {**OPTION_DEFAULTS, **RECIPES[backbone, recipe or "default"]}


def settings_from_options(options: dict) -> tuple[SliceSettings, TrainSettings]:
    """Slice and training settings from CLI options (``vars(args)``): an option left unset (None)
    takes the backbone's and recipe's default."""
    backbone, recipe = options.get("backbone", "compact"), options.get("recipe") or "default"
    preset = recipe_defaults(backbone, recipe)

    def value(name: str):
        given = options.get(name)
        return preset.get(name, getattr(TrainSettings, name, None)) if given is None else given

    context_slices = options.get("context_slices") or 0
    if context_slices < 0:
        raise MedDiffFTError(f"--context-slices {context_slices}: use 0 (no context, the default) or more.")
    if context_slices and backbone != "compact":
        raise MedDiffFTError(f"--context-slices {context_slices} is for the compact backbone only "
                             f"(--backbone {backbone} has no context channels): drop --context-slices, "
                             "or use --backbone compact.")
    slices = SliceSettings(resolution=value("resolution"), axis=str(options["axis"]),
                           intensity=options["intensity"], roi=options["roi"],
                           context=options["context"], scale=options["scale"],
                           context_slices=context_slices)
    unlabeled_given = bool(options.get("unlabeled") or options.get("unlabeled_cases"))
    pretrain_steps = options["pretrain_steps"] if options.get("pretrain_steps") is not None else (
        value("train_steps") if unlabeled_given else 0)
    for name in ("train_steps", "batch_size", "checkpoint_every", "resolution", "grad_accum"):
        if value(name) <= 0:
            raise MedDiffFTError(f"--{name.replace('_', '-')} must be positive.")
    sd = None
    if backbone == "sd-inpaint":
        if options.get("init_model") is not None:
            raise MedDiffFTError("--init-model is for the compact backbone; sd-inpaint starts from --base-model.")
        fields = {name: preset.get(name, getattr(SDSettings, name)) for name in SDSettings.__dataclass_fields__
                  if name != "lora_targets"}
        for name in ("finetune", "lora_rank", "precision", "gradient_checkpointing", "attention",
                     "prompt", "heal_prompt", "negative_prompt"):
            if options.get(name) is not None:
                fields[name] = options[name]
        if recipe == "reference" and options.get("prompt") is not None:
            fields["heal_prompt"] = options["prompt"]  # the reference recipe has one prompt
        fields["lora_alpha"] = float(options.get("lora_alpha") or fields["lora_rank"])  # default: alpha = rank
        targets = options.get("lora_targets")
        fields["lora_targets"] = tuple(targets.split(",")) if targets else SDSettings.lora_targets
        fields["base_model"] = options.get("base_model") or ""
        sd = SDSettings(**fields)
    train = TrainSettings(steps=value("train_steps"), minutes=options.get("train_minutes"),
                          pretrain_steps=pretrain_steps, batch_size=value("batch_size"),
                          learning_rate=value("learning_rate"), warmup_steps=value("warmup_steps"),
                          lesion_weight=value("lesion_weight"), ema_decay=value("ema_decay"),
                          seed=options["seed"], checkpoint_every=options["checkpoint_every"],
                          model_size=options.get("model_size", "small"), curriculum=value("curriculum"),
                          backbone=backbone, recipe=recipe, grad_accum=value("grad_accum"),
                          weight_decay=value("weight_decay"), optimizer=options.get("optimizer") or "adamw",
                          latent_pool=value("latent_pool"),
                          cache_latents=not options.get("no_latent_cache", False), sd=sd)
    return slices, train


@dataclass
class PreparedCase:
    """A case's normalized slice stack (S, H, W[, C]) and foreground stack (S, H, W)."""

    images: np.ndarray
    foreground: np.ndarray
    labeled: bool
    window_size: int


def prepare_case(case: Case, settings: SliceSettings, channels: int, *,
                 labeled: bool = True) -> PreparedCase:
    axis = choose_axis(case.spacing, settings.axis, case.is_2d)
    intensity = fit_intensity(case.image, settings.intensity)
    images = slice_stack(to_channels(intensity.forward(case.image), channels), axis)
    foreground = slice_stack(case.foreground, axis)
    sizes = [window_around(plane, settings.resolution, roi=settings.roi, context=settings.context).size
             for plane in foreground if plane.any()]
    return PreparedCase(images, foreground, labeled,
                        int(np.median(sizes)) if sizes else max(settings.resolution, min(images.shape[1:3])))


class TrainingWindows:
    """Draws training batches: lesion windows under the mask curriculum (exact, dilated, random
    blob), random windows of every labeled slice (lesion-free slices count) and of unlabeled data."""

    def __init__(self, cases: list[Case], unlabeled: list[Case], slices: SliceSettings,
                 curriculum: tuple[float, float, float]) -> None:
        self.slices = slices
        self.curriculum = np.asarray(curriculum, dtype=float) / sum(curriculum)
        # grey data (or a mix of grey and colour) trains a grey model; all-colour data a colour one
        self.channels = min((c.channels for c in cases + unlabeled), default=1)
        self.cases = [prepare_case(c, slices, self.channels) for c in cases]
        self.cases += [prepare_case(c, slices, self.channels, labeled=False) for c in unlabeled]
        self.lesion_items = [(ci, si) for ci, c in enumerate(self.cases) if c.labeled
                             for si in np.flatnonzero(c.foreground.reshape(len(c.foreground), -1).any(1))]
        self.labeled_items = [(ci, si) for ci, c in enumerate(self.cases) if c.labeled
                              for si in range(len(c.images))]
        self.unlabeled_items = [(ci, si) for ci, c in enumerate(self.cases) if not c.labeled
                                for si in range(len(c.images))]
        if cases and not self.lesion_items:
            raise MedDiffFTError("None of the training labels contains any mask: draw the lesion in "
                                 "at least one training case.")
        if not cases and not unlabeled:
            raise MedDiffFTError("No training data: pass labeled cases or unlabeled images.")

    @cached_property
    def data_hash(self) -> str:
        """Content hash of the prepared training data (checkpoint fingerprint, model card)."""
        h = hashlib.sha256()
        for c in self.cases:
            h.update(c.images.tobytes())
            h.update(np.packbits(c.foreground).tobytes())
        return h.hexdigest()

    def _lesion_item(self, rng: np.random.Generator, ci: int, si: int) -> tuple:
        case = self.cases[ci]
        mask = case.foreground[si]
        shift = tuple(rng.uniform(-0.1, 0.1, size=2))
        window = window_around(mask, self.slices.resolution, roi=self.slices.roi,
                               context=self.slices.context, shift=shift, scale=self.slices.scale)
        image = window.extract(case.images[si])
        context = extract_context(window, case.images, si, self.slices.context_slices)
        lesion = window.extract(mask, is_mask=True)
        kind = rng.choice(3, p=self.curriculum)
        if kind == 0:
            region = lesion
        elif kind == 1:
            radius = rng.uniform(1.0, max(2.0, 0.12 * self.slices.resolution))
            region = torch.from_numpy(dilate(lesion[0].numpy() > 0, radius)[None].astype(np.float32))
        else:
            region = torch.from_numpy(random_blob(lesion.shape[1:], rng)[None].astype(np.float32))
            lesion = lesion * region
        return self._crop(rng, image, region, lesion, self._hide(rng, context, region))

    def _hide(self, rng: np.random.Generator, context: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        """Each neighbour plane, with probability 1/2, zeroed inside the region, as sampling shows a
        neighbour that is not generated yet (the others are shown whole, as generated neighbours
        are). Draws nothing without context slices."""
        hide = rng.random(2 * self.slices.context_slices) < 0.5
        if not hide.any():
            return context
        context = context.clone()
        for k in np.flatnonzero(hide):
            context[k * self.channels:(k + 1) * self.channels] *= 1.0 - region
        return context

    def _crop(self, rng: np.random.Generator, image: torch.Tensor, region: torch.Tensor,
              lesion: torch.Tensor, context: torch.Tensor) -> tuple:
        """A ``resolution``-px crop of a larger native window, centred half of the time on the
        region's border (where inpainting is hardest), else anywhere."""
        size, side = image.shape[-1], self.slices.resolution
        if size <= side:
            return image, region, lesion, context
        border = region[0].numpy() > 0
        border = border & ~ndimage.binary_erosion(border)
        if border.any() and rng.random() < 0.5:
            cy, cx = np.argwhere(border)[rng.integers(border.sum())]
        else:
            cy, cx = rng.integers(0, size, size=2)
        y0 = int(np.clip(cy - side // 2, 0, size - side))
        x0 = int(np.clip(cx - side // 2, 0, size - side))
        crop = (..., slice(y0, y0 + side), slice(x0, x0 + side))
        return image[crop], region[crop], lesion[crop], context[crop]

    def _random_item(self, rng: np.random.Generator, ci: int, si: int) -> tuple:
        case = self.cases[ci]
        height, width = case.images.shape[1:3]
        # fit: a lesion-sized window carried to the model size; native: a model-size native crop
        size = case.window_size if self.slices.scale == "fit" else self.slices.resolution
        y0 = int(rng.integers(0, height - size + 1)) if height > size else (height - size) // 2
        x0 = int(rng.integers(0, width - size + 1)) if width > size else (width - size) // 2
        window = Window(y0, x0, size, self.slices.resolution)
        image = window.extract(case.images[si])
        context = extract_context(window, case.images, si, self.slices.context_slices)
        region = torch.from_numpy(random_blob((self.slices.resolution,) * 2, rng)[None].astype(np.float32))
        if case.labeled:
            lesion = window.extract(case.foreground[si], is_mask=True) * region
        else:
            lesion = region * UNKNOWN_LESION
        return image, region, lesion, self._hide(rng, context, region)

    def batch(self, rng: np.random.Generator, batch_size: int, lesion_weight: float,
              pretrain: bool = False) -> dict[str, torch.Tensor]:
        items = []
        for _ in range(batch_size):
            if pretrain:
                pool = self.unlabeled_items + self.labeled_items
                ci, si = pool[rng.integers(len(pool))]
                items.append(self._random_item(rng, ci, si))
            elif rng.random() < 0.85:
                ci, si = self.lesion_items[rng.integers(len(self.lesion_items))]
                items.append(self._lesion_item(rng, ci, si))
            else:
                ci, si = self.labeled_items[rng.integers(len(self.labeled_items))]
                items.append(self._random_item(rng, ci, si))
        image, region, lesion, context = (torch.stack(parts) for parts in zip(*items))
        flip = torch.from_numpy(rng.random(batch_size) < 0.5)
        image[flip], region[flip], lesion[flip] = image[flip].flip(-1), region[flip].flip(-1), lesion[flip].flip(-1)
        context[flip] = context[flip].flip(-1)
        return {"image": image, "region": region, "lesion": lesion, "context": context,
                "lesion_weight": torch.tensor(lesion_weight)}

    def lesion_bank(self, limit: int = 64) -> dict[str, torch.Tensor]:
        """Real lesion windows (model space) for transplant starts (empty without lesions)."""
        if not self.lesion_items:
            return {}
        picks = np.linspace(0, len(self.lesion_items) - 1, num=min(limit, len(self.lesion_items)))
        images, masks = [], []
        for index in np.unique(np.round(picks).astype(int)):
            ci, si = self.lesion_items[index]
            mask = self.cases[ci].foreground[si]
            window = window_around(mask, self.slices.resolution, roi=self.slices.roi,
                                   context=self.slices.context, scale="fit")
            images.append(window.extract(self.cases[ci].images[si]))
            masks.append(window.extract(mask, is_mask=True))
        return {"images": torch.stack(images), "masks": torch.stack(masks)}


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _save_checkpoint(directory: Path, step: int, backbone: Backbone, optimizer: torch.optim.Optimizer,
                     ema: EMAModel | None, scaler: torch.amp.GradScaler, fingerprint: str) -> None:
    final = directory / f"step-{step:07d}"
    tmp = directory / f".step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(backbone.trainable_state(), str(tmp / "model.safetensors"))
    opt_state = optimizer.state_dict()
    tensors = {f"state.{index}.{name}": value.detach().clone().contiguous()
               for index, entries in opt_state["state"].items() for name, value in entries.items()}
    ema_state = ema.state_dict() if ema is not None else {"shadow_params": []}
    tensors.update({f"ema.{i}": p.detach().clone().contiguous()
                    for i, p in enumerate(ema_state.pop("shadow_params"))})
    save_file(tensors, str(tmp / "training.safetensors"))
    ema_state.pop("collected_params", None)
    (tmp / "state.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint,
                                                "param_groups": opt_state["param_groups"],
                                                "ema": ema_state, "grad_scaler": scaler.state_dict()}))
    os.replace(tmp, final)
    for old in sorted(directory.glob("step-*"))[:-2]:
        shutil.rmtree(old)


def _load_checkpoint(directory: Path, backbone: Backbone, optimizer: torch.optim.Optimizer,
                     ema: EMAModel | None, scaler: torch.amp.GradScaler, fingerprint: str) -> int:
    found = sorted(directory.glob("step-*"))
    if not found:
        return 0
    latest = found[-1]
    state = json.loads((latest / "state.json").read_text())
    if state["fingerprint"] != fingerprint:
        raise MedDiffFTError(f"The checkpoints in {directory} were made with other training data or "
                             "settings; resume with the same inputs, or start again with --overwrite.")
    backbone.load_trainable_state(load_file(str(latest / "model.safetensors")))
    tensors = load_file(str(latest / "training.safetensors"))
    opt_state: dict = {"state": {}, "param_groups": state["param_groups"]}
    for key, value in tensors.items():
        kind, index, *name = key.split(".")
        if kind == "state":
            opt_state["state"].setdefault(int(index), {})[".".join(name)] = value
    optimizer.load_state_dict(opt_state)
    if ema is not None:
        ema_state = dict(state["ema"])
        ema_state["shadow_params"] = [tensors[f"ema.{i}"] for i in range(len(list(ema.shadow_params)))]
        ema.load_state_dict(ema_state)
    if state.get("grad_scaler"):  # fp16 runs; empty when loss scaling is off
        scaler.load_state_dict(state["grad_scaler"])
    return int(state["step"])


def distributed_state(device: torch.device):
    """accelerate's process state under ``accelerate launch`` with several processes, else None
    (a single process runs exactly as without accelerate). CPU processes talk through gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=device.type == "cpu")


def _optimizer(params: list, settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    if settings.optimizer == "adamw-8bit":
        try:
            import bitsandbytes
        except ImportError as exc:
            raise MedDiffFTError("--optimizer adamw-8bit needs the bitsandbytes package (CUDA GPUs): "
                                 "pip install bitsandbytes, or use --optimizer adamw.") from exc
        return bitsandbytes.optim.AdamW8bit(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    raise MedDiffFTError(f"--optimizer {settings.optimizer}: use adamw or adamw-8bit.")


class WindowPool:
    """A fixed pool of single-window batches drawn once from the seed; with ``cached`` the
    backbone's ``encode_batch`` output (e.g. VAE latents) is computed once per window, else at
    every use. Either way a step's batch is the same function of (seed, step)."""

    def __init__(self, backbone: Backbone, windows: "TrainingWindows", settings: TrainSettings,
                 device: torch.device, progress: Progress) -> None:
        self.backbone, self.cached = backbone, settings.cache_latents
        self.lesion_weight = torch.tensor(settings.lesion_weight)
        self.items = []
        with progress.stage("cache latents" if self.cached else "draw windows", settings.latent_pool) as advance:
            for index in range(settings.latent_pool):
                item = windows.batch(np.random.default_rng([settings.seed, POOL_KEY, index]), 1, 0.0)
                item = {k: v.to(device) for k, v in item.items() if k != "lesion_weight"}
                self.items.append({**item, **backbone.encode_batch(item)} if self.cached else item)
                advance(1)

    def batch(self, rng: np.random.Generator, batch_size: int) -> dict[str, torch.Tensor]:
        picks = [self.items[i] for i in rng.integers(len(self.items), size=batch_size)]
        if not self.cached:
            picks = [{**item, **self.backbone.encode_batch(item)} for item in picks]
        return {**{k: torch.cat([item[k] for item in picks]) for k in picks[0]},
                "lesion_weight": self.lesion_weight}


def _draw_seeds(settings: TrainSettings, step: int, part: int) -> tuple[np.random.Generator, torch.Generator]:
    """Seeds of micro-batch ``part`` (accumulation step and process) of ``step``; part 0 keeps
    the keys of a single-process run without accumulation."""
    extra = [part] if part else []
    return (np.random.default_rng([settings.seed, step, *extra]),
            torch.Generator().manual_seed(settings.seed * 1_000_003 + step + 1_000_000_007 * part))


def train(backbone: Backbone, windows: TrainingWindows, settings: TrainSettings, *,
          device: torch.device, checkpoint_dir: Path | None, progress: Progress,
          write_checkpoints: bool = True) -> dict:
    """Train ``backbone`` in place (EMA weights at the end, when kept); returns statistics."""
    params = [p for p in backbone.trainable_parameters() if p.requires_grad]
    optimizer = _optimizer(params, settings)
    ema = EMAModel(params, decay=settings.ema_decay, use_ema_warmup=True, power=0.75) if settings.ema_decay else None
    scaler = torch.amp.GradScaler(device.type, enabled=backbone.needs_loss_scaling())
    fingerprint = hashlib.sha256(json.dumps(
        [windows.data_hash, asdict(settings) | {"minutes": None}, asdict(windows.slices)],
        sort_keys=True).encode()).hexdigest()
    dist = distributed_state(device)
    rank = dist.process_index if dist is not None else 0
    start = 0
    if checkpoint_dir is not None:
        start = _load_checkpoint(checkpoint_dir, backbone, optimizer, ema, scaler, fingerprint)
    pool = WindowPool(backbone, windows, settings, device, progress) if settings.latent_pool else None
    total = settings.pretrain_steps + settings.steps
    started = time.monotonic()
    losses: list[float] = []
    step = start
    with progress.stage("finetune", total) as advance:
        if start:
            advance(start)
        for step in range(start, total):
            if settings.minutes is not None and time.monotonic() - started > settings.minutes * 60:
                break
            for group in optimizer.param_groups:
                group["lr"] = settings.learning_rate * min(1.0, (step + 1) / max(1, settings.warmup_steps))
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro in range(settings.grad_accum):
                rng, generator = _draw_seeds(settings, step, micro + settings.grad_accum * rank)
                pretrain = step < settings.pretrain_steps
                if pool is not None and not pretrain:
                    batch = pool.batch(rng, settings.batch_size)
                else:
                    batch = windows.batch(rng, settings.batch_size, settings.lesion_weight, pretrain=pretrain)
                batch = {k: v.to(device) for k, v in batch.items()}
                loss = backbone.training_loss(batch, generator) / settings.grad_accum
                scaler.scale(loss).backward()
                step_loss += float(loss.detach())
            if dist is not None:
                from accelerate.utils import reduce

                grads = reduce([p.grad for p in params], reduction="mean")
                for p, grad in zip(params, grads):
                    p.grad = grad
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(optimizer)  # skipped when fp16 gradients overflowed (the scale then shrinks)
            scaler.update()
            if ema is not None:
                ema.step(params)
            losses.append(step_loss)
            if (checkpoint_dir is not None and write_checkpoints
                    and (step + 1) % settings.checkpoint_every == 0):
                _save_checkpoint(checkpoint_dir, step + 1, backbone, optimizer, ema, scaler, fingerprint)
            advance(1)
        else:
            step = total
    if ema is not None:
        ema.copy_to(params)
    return {"steps_done": step, "seconds": round(time.monotonic() - started, 2),
            "final_loss": float(np.mean(losses[-20:])) if losses else None, "losses": losses,
            "processes": dist.num_processes if dist is not None else 1,
            "loss_scale": scaler.get_scale() if scaler.is_enabled() else None}


def make_backbone(settings: TrainSettings, slices: SliceSettings, channels: int,
                  device: torch.device) -> Backbone:
    """A fresh backbone of ``settings.backbone`` kind, on ``device``."""
    if settings.backbone == "sd-inpaint":
        return SDInpaintBackbone.create(settings.sd, resolution=slices.resolution, channels=channels,
                                        device=device)
    if settings.backbone != "compact":
        raise MedDiffFTError(f"--backbone {settings.backbone}: use compact or sd-inpaint.")
    return CompactBackbone.create(resolution=slices.resolution, channels=channels,
                                  size=settings.model_size,
                                  context_slices=slices.context_slices).to(device)


def finetune_model(cases: list[Case], *, model_out: Path, slices: SliceSettings,
                   settings: TrainSettings, device: torch.device, progress: Progress,
                   unlabeled: list[Case] = (), init_model: str | None = None,
                   keep_checkpoints: bool = False,
                   extra_stages: Sequence[Callable[[Path], tuple[str, dict]]] = ()) -> dict:
    """Fine-tune a backbone (``settings.backbone``) on ``cases`` and write a model folder to
    ``model_out``.

    Checkpoints go to ``model_out/checkpoints`` (resumed from when present). ``extra_stages`` train
    the other parts of a model folder (mask generator, quality reference): each writes into the
    folder and returns (model card key, card entry). The model card is written last. Returns it.
    Under ``accelerate launch`` only the main process writes; the others return the card unwritten.
    """
    torch.manual_seed(settings.seed)
    dist = distributed_state(device)
    if dist is not None:
        device = dist.device
    is_main = dist is None or dist.is_main_process
    windows = TrainingWindows(list(cases), list(unlabeled), slices, settings.curriculum)
    if init_model is not None:
        backbone, init_card, _ = load_model(init_model, device)
        if init_card["resolution"] != slices.resolution or backbone.channels != windows.channels:
            raise MedDiffFTError(f"--init-model {init_model} works at {init_card['resolution']} px with "
                                 f"{backbone.channels} channel(s); these cases need "
                                 f"{slices.resolution} px with {windows.channels}: pass --resolution "
                                 f"{init_card['resolution']} or pretrain a matching model.")
        if backbone.context_slices != slices.context_slices:
            raise MedDiffFTError(f"--init-model {init_model} was trained with --context-slices "
                                 f"{backbone.context_slices}, this fine-tune asks for "
                                 f"{slices.context_slices}: pass --context-slices "
                                 f"{backbone.context_slices}, or pretrain a model with "
                                 f"--context-slices {slices.context_slices}.")
        backbone.to(device)
    else:
        backbone = make_backbone(settings, slices, windows.channels, device)
    checkpoint_dir = model_out / "checkpoints"
    if dist is not None:
        dist.wait_for_everyone()  # every process has checked the output folder before it is created
    if is_main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    stats = train(backbone, windows, settings, device=device, checkpoint_dir=checkpoint_dir,
                  progress=progress, write_checkpoints=is_main)
    card = {
        "slices": asdict(slices),
        "training": {**asdict(settings), **{k: v for k, v in stats.items() if k != "losses"},
                     "data_hash": windows.data_hash, "init_model": init_model,
                     "cases": [{"image": c.image_path, "label": c.label_path} for c in cases],
                     "unlabeled": [c.image_path for c in unlabeled]},
        "resolution": slices.resolution,
        "channels": windows.channels,
        "parameters": sum(p.numel() for p in backbone.trainable_parameters()),
    }
    if backbone.describe():
        card["backbone_settings"] = backbone.describe()
    if not is_main:
        dist.wait_for_everyone()
        return card
    for stage in extra_stages:
        key, entry = stage(model_out)
        card[key] = entry
    save_model(model_out, backbone, card, windows.lesion_bank())
    (model_out / "training_loss.json").write_text(json.dumps(stats["losses"]))
    if not keep_checkpoints:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    if dist is not None:
        dist.wait_for_everyone()
    return card
