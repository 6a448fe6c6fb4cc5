"""The backbone interface and the model folder.

A backbone is an inpainting diffusion model in "model space" (C channels in [-1, 1] at
``resolution`` px). It computes its own training loss and denoises under the dynamic guiding mask;
the training loop, slicing, masks and outputs are shared. A model folder holds the backbone's
``save_pretrained`` output, ``meddiffft.json`` (what made it and how to prepare inputs for it) and
``lesion_bank.safetensors`` (real training lesions for transplant starts).
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .errors import MedDiffFTError

MODEL_FORMAT_VERSION = 1
MODEL_CARD = "meddiffft.json"
LESION_BANK = "lesion_bank.safetensors"


@dataclass
class InpaintRequest:
    """One batch to inpaint, all tensors (B, ., R, R) in model space.

    ``region``: where to generate (binary); ``lesion``: where the lesion must be (binary; the
    rest of the region is healed as non-lesion tissue); ``init``: optional start image. Text-
    conditioned backbones use ``prompt``/``negative_prompt``/``guidance_scale`` (None: the
    model's own); others ignore them. ``context``: (B, 2 N C, R, R) neighbouring slices for a
    backbone with ``context_slices`` N > 0 (None when N = 0).
    """

    background: torch.Tensor
    region: torch.Tensor
    lesion: torch.Tensor
    generators: list[torch.Generator]
    init: torch.Tensor | None = None
    strength: float = 1.0
    prompt: str | None = None
    negative_prompt: str | None = None
    guidance_scale: float | None = None
    context: torch.Tensor | None = None


class Backbone(ABC):
    """What the engine needs from an inpainting model. ``context_slices`` N: the model also sees
    the N slices below and above the current one (batch key / request field ``context``)."""

    kind: str
    resolution: int
    channels: int
    context_slices: int = 0

    @abstractmethod
    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]: ...

    @abstractmethod
    def training_loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """Loss for a batch with ``image`` (B,C,R,R), ``region`` and ``lesion`` (B,1,R,R)."""

    def encode_batch(self, batch: dict[str, torch.Tensor],
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The deterministic part of ``training_loss``'s input preparation, which training may
        compute once per cached window (e.g. VAE latents); pixel-space backbones need none."""
        return {}

    def describe(self) -> dict:
        """Backbone settings for the model card."""
        return {}

    @abstractmethod
    def inpaint(self, request: InpaintRequest, *, sampler: str, num_steps: int,
                on_step: Callable[[], None] | None = None) -> torch.Tensor:
        """Generate inside ``request.region``; equal to the background outside it."""

    def needs_loss_scaling(self) -> bool:
        """Training runs under fp16 autocast, whose small gradients underflow without a loss scale."""
        return False

    def sampling_used(self, sampler: str, num_steps: int) -> dict:
        """The sampler and steps ``inpaint`` runs for these options (for the manifest); a recipe
        that fixes its own says so here."""
        return {"sampler": sampler, "sampling_steps": num_steps}

    @abstractmethod
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The weights that training changes (for checkpoints)."""

    @abstractmethod
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None: ...

    @abstractmethod
    def save_pretrained(self, directory: Path) -> None: ...

    @abstractmethod
    def to(self, device: torch.device) -> "Backbone": ...


def resolve_device(name: str) -> torch.device:
    """``auto`` = CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MedDiffFTError("--device cuda: no CUDA GPU is available here; use --device cpu or auto.")
    if name not in ("cpu", "cuda"):
        raise MedDiffFTError(f"--device {name}: use auto, cpu or cuda.")
    return torch.device(name)


def backbone_classes() -> dict[str, type]:
    from .compact import CompactBackbone
    from .sd_inpaint import SDInpaintBackbone

    return {CompactBackbone.kind: CompactBackbone, SDInpaintBackbone.kind: SDInpaintBackbone}


def read_model_card(model_dir: str | os.PathLike) -> dict:
    """Read and check ``meddiffft.json``: the folder must be a complete model this version can load."""
    path = Path(model_dir) / MODEL_CARD
    if not Path(model_dir).is_dir():
        raise MedDiffFTError(f"Model folder {model_dir} does not exist: fine-tune one with "
                             "`meddiffft finetune ... --model-out DIR` first.")
    if not path.is_file():
        raise MedDiffFTError(f"{model_dir} is not a MedDiffFT model folder (no {MODEL_CARD}); an "
                             "unfinished fine-tune can be continued with `meddiffft finetune --resume`.")
    card = json.loads(path.read_text())
    if card.get("format_version") != MODEL_FORMAT_VERSION:
        raise MedDiffFTError(f"{model_dir} was written by MedDiffFT {card.get('library_version')} "
                             f"(model format {card.get('format_version')}); this is {__version__} "
                             f"(format {MODEL_FORMAT_VERSION}). Fine-tune the model again.")
    if card.get("backbone") not in backbone_classes():
        raise MedDiffFTError(f"{model_dir} holds a {card.get('backbone')!r} backbone, which this "
                             f"installation cannot load (known: {', '.join(backbone_classes())}).")
    return card


def load_model(model_dir: str | os.PathLike, device: torch.device) -> tuple[Backbone, dict, dict]:
    """Load (backbone, model card, lesion bank) from a model folder."""
    card = read_model_card(model_dir)
    backbone = backbone_classes()[card["backbone"]].from_pretrained(Path(model_dir)).to(device)
    bank_path = Path(model_dir) / LESION_BANK
    bank = load_file(str(bank_path)) if bank_path.is_file() else {}
    return backbone, card, bank


def save_model(directory: Path, backbone: Backbone, card: dict, bank: dict[str, torch.Tensor]) -> None:
    """Write a model folder; ``meddiffft.json`` goes last, so its presence marks a complete model."""
    from .outputs import write_json  # outputs imports the engine, which imports this module
    directory.mkdir(parents=True, exist_ok=True)
    backbone.save_pretrained(directory)
    if bank:
        save_file({k: v.contiguous().cpu() for k, v in bank.items()}, str(directory / LESION_BANK))
    card = {"format_version": MODEL_FORMAT_VERSION, "library_version": __version__,
            "backbone": backbone.kind, **card}
    write_json(directory / MODEL_CARD, card)
