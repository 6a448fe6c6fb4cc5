"""Fine-tuning: training windows with a mask curriculum, and a resumable training loop.

Every batch is a pure function of (seed, step, data), so a run resumed from a checkpoint ends with
exactly the weights of an uninterrupted run. Checkpoints (weights, optimizer, EMA) are
safetensors + JSON: nothing is unpickled.
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
from .slicing import Window, choose_axis, fit_intensity, slice_stack, to_channels, window_around

UNKNOWN_LESION = 0.5  # lesion channel value for unlabeled data


@dataclass
class SliceSettings:
    """How cases become model-space windows; saved in the model card and reused for sampling."""

    resolution: int = 64
    axis: str = "auto"
    intensity: str = "auto"
    roi: str = "auto"
    context: float = 0.5
    scale: str = "native"


@dataclass
class TrainSettings:
    """The fine-tuning recipe. ``minutes`` (when set) stops training early at a time budget."""

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
        return self._crop(rng, image, region, lesion)

    def _crop(self, rng: np.random.Generator, image: torch.Tensor, region: torch.Tensor,
              lesion: torch.Tensor) -> tuple:
        """A ``resolution``-px crop of a larger native window, centred half of the time on the
        region's border (where inpainting is hardest), else anywhere."""
        size, side = image.shape[-1], self.slices.resolution
        if size <= side:
            return image, region, lesion
        border = region[0].numpy() > 0
        border = border & ~ndimage.binary_erosion(border)
        if border.any() and rng.random() < 0.5:
            cy, cx = np.argwhere(border)[rng.integers(border.sum())]
        else:
            cy, cx = rng.integers(0, size, size=2)
        y0 = int(np.clip(cy - side // 2, 0, size - side))
        x0 = int(np.clip(cx - side // 2, 0, size - side))
        crop = (..., slice(y0, y0 + side), slice(x0, x0 + side))
        return image[crop], region[crop], lesion[crop]

    def _random_item(self, rng: np.random.Generator, ci: int, si: int) -> tuple:
        case = self.cases[ci]
        height, width = case.images.shape[1:3]
        # fit: a lesion-sized window carried to the model size; native: a model-size native crop
        size = case.window_size if self.slices.scale == "fit" else self.slices.resolution
        y0 = int(rng.integers(0, height - size + 1)) if height > size else (height - size) // 2
        x0 = int(rng.integers(0, width - size + 1)) if width > size else (width - size) // 2
        window = Window(y0, x0, size, self.slices.resolution)
        image = window.extract(case.images[si])
        region = torch.from_numpy(random_blob((self.slices.resolution,) * 2, rng)[None].astype(np.float32))
        if case.labeled:
            lesion = window.extract(case.foreground[si], is_mask=True) * region
        else:
            lesion = region * UNKNOWN_LESION
        return image, region, lesion

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
        image, region, lesion = (torch.stack(parts) for parts in zip(*items))
        flip = torch.from_numpy(rng.random(batch_size) < 0.5)
        image[flip], region[flip], lesion[flip] = image[flip].flip(-1), region[flip].flip(-1), lesion[flip].flip(-1)
        return {"image": image, "region": region, "lesion": lesion,
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
                     ema: EMAModel, fingerprint: str) -> None:
    final = directory / f"step-{step:07d}"
    tmp = directory / f".step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(backbone.trainable_state(), str(tmp / "model.safetensors"))
    opt_state = optimizer.state_dict()
    tensors = {f"state.{index}.{name}": value.detach().clone().contiguous()
               for index, entries in opt_state["state"].items() for name, value in entries.items()}
    ema_state = ema.state_dict()
    tensors.update({f"ema.{i}": p.detach().clone().contiguous()
                    for i, p in enumerate(ema_state.pop("shadow_params"))})
    save_file(tensors, str(tmp / "training.safetensors"))
    ema_state.pop("collected_params", None)
    (tmp / "state.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint,
                                                "param_groups": opt_state["param_groups"],
                                                "ema": ema_state}))
    os.replace(tmp, final)
    for old in sorted(directory.glob("step-*"))[:-2]:
        shutil.rmtree(old)


def _load_checkpoint(directory: Path, backbone: Backbone, optimizer: torch.optim.Optimizer,
                     ema: EMAModel, fingerprint: str) -> int:
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
    ema_state = dict(state["ema"])
    ema_state["shadow_params"] = [tensors[f"ema.{i}"] for i in range(len(list(ema.shadow_params)))]
    ema.load_state_dict(ema_state)
    return int(state["step"])


def train(backbone: Backbone, windows: TrainingWindows, settings: TrainSettings, *,
          device: torch.device, checkpoint_dir: Path | None, progress: Progress) -> dict:
    """Train ``backbone`` in place (EMA weights at the end); returns training statistics."""
    params = [p for p in backbone.trainable_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    ema = EMAModel(params, decay=settings.ema_decay, use_ema_warmup=True, power=0.75)
    fingerprint = hashlib.sha256(json.dumps(
        [windows.data_hash, asdict(settings) | {"minutes": None}, asdict(windows.slices)],
        sort_keys=True).encode()).hexdigest()
    start = 0
    if checkpoint_dir is not None:
        start = _load_checkpoint(checkpoint_dir, backbone, optimizer, ema, fingerprint)
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
            rng = np.random.default_rng([settings.seed, step])
            generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
            batch = windows.batch(rng, settings.batch_size, settings.lesion_weight,
                                  pretrain=step < settings.pretrain_steps)
            batch = {k: v.to(device) for k, v in batch.items()}
            for group in optimizer.param_groups:
                group["lr"] = settings.learning_rate * min(1.0, (step + 1) / max(1, settings.warmup_steps))
            loss = backbone.training_loss(batch, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            ema.step(params)
            losses.append(float(loss.detach()))
            if checkpoint_dir is not None and (step + 1) % settings.checkpoint_every == 0:
                _save_checkpoint(checkpoint_dir, step + 1, backbone, optimizer, ema, fingerprint)
            advance(1)
        else:
            step = total
    ema.copy_to(params)
    return {"steps_done": step, "seconds": round(time.monotonic() - started, 2),
            "final_loss": float(np.mean(losses[-20:])) if losses else None, "losses": losses}


def finetune_model(cases: list[Case], *, model_out: Path, slices: SliceSettings,
                   settings: TrainSettings, device: torch.device, progress: Progress,
                   unlabeled: list[Case] = (), init_model: str | None = None,
                   keep_checkpoints: bool = False,
                   extra_stages: Sequence[Callable[[Path], tuple[str, dict]]] = ()) -> dict:
    """Fine-tune a compact backbone on ``cases`` and write a model folder to ``model_out``.

    Checkpoints go to ``model_out/checkpoints`` (resumed from when present). ``extra_stages`` train
    the other parts of a model folder (mask generator, quality reference): each writes into the
    folder and returns (model card key, card entry). The model card is written last. Returns it.
    """
    torch.manual_seed(settings.seed)
    windows = TrainingWindows(list(cases), list(unlabeled), slices, settings.curriculum)
    if init_model is not None:
        backbone, init_card, _ = load_model(init_model, device)
        if init_card["resolution"] != slices.resolution or backbone.channels != windows.channels:
            raise MedDiffFTError(f"--init-model {init_model} works at {init_card['resolution']} px with "
                                 f"{backbone.channels} channel(s); these cases need "
                                 f"{slices.resolution} px with {windows.channels}: pass --resolution "
                                 f"{init_card['resolution']} or pretrain a matching model.")
    else:
        backbone = CompactBackbone.create(resolution=slices.resolution, channels=windows.channels,
                                          size=settings.model_size)
    backbone.to(device)
    checkpoint_dir = model_out / "checkpoints"
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    stats = train(backbone, windows, settings, device=device, checkpoint_dir=checkpoint_dir,
                  progress=progress)
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
    for stage in extra_stages:
        key, entry = stage(model_out)
        card[key] = entry
    save_model(model_out, backbone, card, windows.lesion_bank())
    (model_out / "training_loss.json").write_text(json.dumps(stats["losses"]))
    if not keep_checkpoints:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return card
