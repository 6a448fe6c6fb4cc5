"""Generation: for each sample, propose a new lesion on a background, inpaint every slice that
holds it under the dynamic guiding mask, and paste the result back into the native slices.

Outside the regenerated region dilated by the seam width the output equals the input exactly;
inside the seam the generated and original pixels are feathered. When the new lesion differs from
the old one, the old lesion's place is regenerated as tissue (healed) in the same pass. A model
with context slices (``--context-slices N`` at training) sees the N slices on each side of the one
it paints as the volume stands at that moment: already generated neighbours (in ``propagate``
order, the inner ones) whole, the others as the background with the region to regenerate (theirs
and this slice's) zeroed, so the old lesion there is not copied.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .backbone import Backbone, InpaintRequest
from .caseio import Case, cast_like, image_key
from .corrosion import erode_label
from .errors import MedDiffFTError, PlacementError
from .masks import MaskSource, dilate, make_mask_source, place_label
from .progress import Progress
from .slicing import (bounding_box, choose_axis, context_indices, extract_context, fit_intensity,
                      slice_stack, to_channels, window_around)

MAX_SEAM = 8
SLICE_COHERENCE = {  # bench/coherence.py measures them (a shared noise seed made slices near-copies)
    "independent": "each slice in its own window",
    "propagate": "one window around the lesion on all slices; the centre slice first, then outwards, "
                 "each slice starting from its generated neighbour noised to --strength",
}

# Raised whenever a case's samples are seeded differently, so evaluate does not reuse generations
# seeded another way (1: --seed + k for every case; 2: ``sample_seed``, per case).
SAMPLE_SEEDING = 2


@dataclass
class SampleSettings:
    """Sampling options (CLI names in brackets): samples [--samples], seed [--seed; sample k of a
    case draws with ``sample_seed``], solver steps [--sampling-steps], sampler [--sampler], start
    [--init noise | transplant] and its [--strength], mask source [--mask-source / --jitter; the CLI's default,
    generator, needs the model folder: pass its source to generate_samples], label erosion
    [--erode auto|0|PX, --erode-changed], seam width in native
    px [--seam, at most 8], slices per forward pass [--slice-batch], how the slices of a volume
    hang together [--slice-coherence, see SLICE_COHERENCE]; text-conditioned backbones:
    [--guidance-scale] and [--negative-prompt] (None: the model's own)."""

    samples: int = 4
    seed: int = 0
    sampling_steps: int = 25
    sampler: str = "dpmsolver++"
    init: str = "noise"
    strength: float = 0.7
    mask_source: str = "label"
    erode: str = "auto"
    erode_changed: bool = False
    seam: int = 3
    slice_batch: int = 16
    slice_coherence: str = "propagate"
    guidance_scale: float | None = None
    negative_prompt: str | None = None


@dataclass
class Sample:
    """One synthetic pair on ``background``'s grid, with what produced it."""

    image: np.ndarray
    label: np.ndarray
    foreground: np.ndarray
    guide: np.ndarray
    regenerated: np.ndarray
    background: Case
    seed: int
    slices: list[int]
    seconds: float
    details: dict = field(default_factory=dict)


class SampleFilter(Protocol):
    """Scores a sample and decides whether to keep it (quality assessment plugs in here)."""

    name: str

    def assess(self, sample: Sample, source: Case) -> tuple[bool, dict]: ...


def seam_weights(region: np.ndarray, seam: int) -> np.ndarray:
    """1 inside the region, falling linearly to 0 at ``seam`` px outside it (exactly 0 beyond)."""
    if seam <= 0:
        return region.astype(np.float64)
    distance = ndimage.distance_transform_edt(~region)
    return np.clip(1.0 - distance / seam, 0.0, 1.0)


def _transplant(background: torch.Tensor, region: torch.Tensor, lesion: torch.Tensor,
                bank: dict[str, torch.Tensor], pick: int) -> torch.Tensor:
    """Start image: a real training lesion warped into the lesion's box, the rest of the region
    filled with the mean of the surrounding tissue."""
    ring = torch.from_numpy(dilate(region[0].numpy() > 0, 3) & ~(region[0].numpy() > 0))
    fill = background[:, ring].mean(dim=1) if ring.any() else background.mean(dim=(1, 2))
    start = torch.where(region > 0, fill[:, None, None], background)
    if lesion.sum() == 0:
        return start
    bank_mask = bank["masks"][pick, 0].numpy() > 0
    by0, by1, bx0, bx1 = bounding_box(bank_mask)
    ty0, ty1, tx0, tx1 = bounding_box(lesion[0].numpy() > 0)
    patch = bank["images"][pick:pick + 1, :, by0:by1, bx0:bx1]
    patch = F.interpolate(patch, size=(ty1 - ty0, tx1 - tx0), mode="bilinear", align_corners=False)[0]
    placed = start.clone()
    placed[:, ty0:ty1, tx0:tx1] = patch
    return torch.where(lesion > 0, placed, start)


def _work_order(settings: SampleSettings, windows: list) -> tuple[list[list[int]], dict[int, int]]:
    """Positions (in the list of slices to generate) that run together, in order, and for
    ``propagate`` the already generated neighbour each position starts from: the central slice
    first, then one slice further out on each side per pass."""
    count = len(windows)
    if settings.slice_coherence == "propagate" and count:
        centre = count // 2
        waves = [[centre]] + [[p for p in (centre + k, centre - k) if 0 <= p < count]
                              for k in range(1, max(centre, count - 1 - centre) + 1)]
        return waves, {p: p - 1 if p > centre else p + 1 for p in range(count) if p != centre}
    groups: dict[int, list[int]] = {}  # slices whose windows share a model-space size run together
    for i, window in enumerate(windows):
        groups.setdefault(window.resolution, []).append(i)
    return [ids[k:k + settings.slice_batch] for ids in groups.values()
            for k in range(0, len(ids), settings.slice_batch)], {}


def sample_seed(seed: int, image: np.ndarray, index: int) -> int:
    """The seed of sample ``index`` of the case whose image is ``image`` (its new lesion's shape
    and place, its noise): ``seed`` (--seed), the sample's number and the image's content, mixed.
    Each case of a run thus gets its own lesions (seed + index alone gave every case of a run the
    same few shapes), and a case's samples depend neither on the other cases, their order, nor
    the process that makes them."""
    return int(np.random.SeedSequence([seed, index, int(image_key(image), 16)]).generate_state(1)[0] >> 1)


def generate_sample(backbone: Backbone, card: dict, bank: dict, case: Case, background: Case,
                    settings: SampleSettings, seed: int, check_cancel: Callable[[], None],
                    mask_source: MaskSource) -> Sample:
    """Make the sample of ``case`` on ``background`` that ``seed`` (``sample_seed``) draws;
    ``check_cancel`` runs after every forward batch."""
    started = time.monotonic()
    rng = np.random.default_rng(seed)
    slices_cfg = card["slices"]
    axis = choose_axis(background.spacing, slices_cfg["axis"], background.is_2d)
    label, foreground = place_label(case.label, case.foreground, background.foreground.shape)
    proposal = mask_source.propose(label, foreground, axis, rng, background)
    old = proposal.healed  # the background's own lesion (if healed) is painted over where not repainted
    new_stack = slice_stack(proposal.foreground, axis)
    old_stack = slice_stack(old, axis)
    intensity = fit_intensity(background.image, slices_cfg["intensity"])
    # model-space volume as it stands: each slice is replaced by its result once generated (context)
    normalized = slice_stack(to_channels(intensity.forward(background.image), backbone.channels), axis)
    out_image = background.image.copy()
    out_stack = slice_stack(out_image, axis)
    source_stack = slice_stack(background.image, axis)
    regenerated = np.zeros(background.foreground.shape, dtype=bool)
    regen_stack = slice_stack(regenerated, axis)
    pick = int(rng.integers(len(bank["images"]))) if settings.init == "transplant" else 0
    todo = []
    for s in range(len(new_stack)):
        region = new_stack[s] | old_stack[s]  # the old lesion's edge is blended by the seam
        if region.any():
            todo.append((s, region))
    shared = settings.slice_coherence == "propagate"  # one window for all slices
    window_masks = [np.any([region for _, region in todo], axis=0)] * len(todo) if shared and todo \
        else [region for _, region in todo]
    windows = [window_around(mask, backbone.resolution, roi=slices_cfg["roi"],
                             context=slices_cfg["context"], scale=slices_cfg["scale"])
               for mask in window_masks]
    chunks, neighbour = _work_order(settings, windows)
    generated_at: dict[int, torch.Tensor] = {}
    done: set[int] = set()  # slices generated so far, and each slice's region (context)
    region_of = dict(todo)
    for chunk_ids in chunks:
        chunk = [todo[i] for i in chunk_ids]
        chunk_windows = [windows[i] for i in chunk_ids]
        bg = torch.stack([w.extract(normalized[s]) for w, (s, _) in zip(chunk_windows, chunk)])
        region_t = torch.stack([w.extract(r, is_mask=True) for w, (_, r) in zip(chunk_windows, chunk)])
        lesion_t = torch.stack([w.extract(new_stack[s], is_mask=True)
                                for w, (s, _) in zip(chunk_windows, chunk)])
        context = torch.stack([extract_context(w, normalized, s, backbone.context_slices)
                               for w, (s, _) in zip(chunk_windows, chunk)])
        for b, (w, (s, _)) in enumerate(zip(chunk_windows, chunk)):
            for k, t in enumerate(context_indices(s, len(normalized), backbone.context_slices)):
                if t is not None and t not in done:  # not generated yet: its old content is hidden
                    hidden = region_t[b]
                    if t in region_of:
                        hidden = torch.maximum(hidden, w.extract(region_of[t], is_mask=True))
                    context[b, k * backbone.channels:(k + 1) * backbone.channels] *= 1.0 - hidden
        init = None
        if chunk_ids[0] in neighbour:  # start from the generated neighbour, noised to --strength
            previous = torch.stack([generated_at[neighbour[i]] for i in chunk_ids]).to(bg.device)
            init = torch.where(region_t > 0, previous, bg)
        elif settings.init == "transplant":
            init = torch.stack([_transplant(b, r, l, bank, pick) for b, r, l in zip(bg, region_t, lesion_t)])
        generators = [torch.Generator().manual_seed(seed * 100_003 + s) for s, _ in chunk]
        request = InpaintRequest(bg, region_t, lesion_t, generators, init=init,
                                 strength=settings.strength if init is not None else 1.0,
                                 negative_prompt=settings.negative_prompt,
                                 guidance_scale=settings.guidance_scale, context=context)
        result = backbone.inpaint(request, sampler=settings.sampler, num_steps=settings.sampling_steps)
        generated_at.update(zip(chunk_ids, result))
        for window, (s, region), generated in zip(chunk_windows, chunk, result):
            native = intensity.inverse(window.to_native(generated))
            if native.ndim == 2 and background.channels > 1:  # grey model, colour-stored image
                native = native[..., None]
            rows, cols, wrows, wcols = window.slice_bounds(region.shape)
            weights = seam_weights(region, settings.seam)[rows, cols]
            original = source_stack[s][rows, cols].astype(np.float64)
            if original.ndim == 3:
                weights = weights[..., None]
            blended = weights * native[wrows, wcols] + (1.0 - weights) * original
            plane = out_stack[s][rows, cols]
            out_stack[s][rows, cols] = np.where(weights > 0, cast_like(blended, background), plane)
            regen_stack[s] = region
            done.add(s)
            normalized[s] = to_channels(intensity.forward(out_stack[s]), backbone.channels, spatial_dims=2)
        check_cancel()
    changed = None
    if settings.erode_changed:
        changed = out_image != background.image
        changed = changed.any(axis=-1) if changed.ndim > proposal.foreground.ndim else changed
    out_label, out_foreground, erosion = erode_label(proposal.label, proposal.foreground, axis,
                                                     settings.erode, changed=changed)
    out_foreground |= background.foreground & ~proposal.healed & ~regenerated  # a kept old lesion
    return Sample(image=out_image, label=out_label, foreground=out_foreground, guide=proposal.foreground,
                  regenerated=regenerated, background=background, seed=seed,
                  slices=[int(s) for s, _ in todo], seconds=round(time.monotonic() - started, 3),
                  details={"axis": axis, "mask_source": settings.mask_source, **proposal.details,
                           "erode": erosion})


def generate_samples(backbone: Backbone, card: dict, bank: dict, case: Case, *,
                     settings: SampleSettings, progress: Progress, backgrounds: list[Case] = (),
                     sample_filter: SampleFilter | None = None,
                     keep_best: int | None = None, mask_source: MaskSource | None = None) -> tuple[list[Sample], list[dict]]:
    """All samples for one case; returns (kept samples, rejected entries with reasons). With
    ``keep_best`` N, only the N passing samples with the best overall score (``details["qa"]
    ["overall"]``) are kept; the other passing ones are rejected as not among the best."""
    if not 0 <= settings.seam <= MAX_SEAM:
        raise MedDiffFTError(f"--seam {settings.seam}: use 0 to {MAX_SEAM} px.")
    if settings.init not in ("noise", "transplant"):
        raise MedDiffFTError(f"--init {settings.init}: use noise or transplant.")
    if settings.slice_coherence not in SLICE_COHERENCE:
        raise MedDiffFTError(f"--slice-coherence {settings.slice_coherence}: use "
                             f"{', '.join(SLICE_COHERENCE)}.")
    if settings.init == "transplant" and not bank:
        raise MedDiffFTError("--init transplant needs real lesions (lesion_bank.safetensors), which a "
                             "model pretrained without labels lacks: fine-tune it on labeled cases.")
    backgrounds = list(backgrounds) or [case]
    mask_source = mask_source or make_mask_source(settings.mask_source)
    kept, rejected = [], []
    # counted in samples: a sample's slice count is known only once its new lesion is drawn
    with progress.stage("sample", settings.samples) as advance:
        for index in range(settings.samples):
            background = backgrounds[index % len(backgrounds)]
            seed = sample_seed(settings.seed, case.image, index)
            try:
                sample = generate_sample(backbone, card, bank, case, background,
                                         settings, seed, progress.check_cancel, mask_source)
            except PlacementError as exc:
                sample = None
                rejected.append({"seed": seed, "source_image": case.image_path,
                                 "background_image": background.image_path, "reason": str(exc)})
            advance(1)
            if sample is None:
                continue
            if sample_filter is not None:
                keep, scores = sample_filter.assess(sample, case)
                sample.details["qa"] = scores
                if not keep:
                    rejected.append({"seed": sample.seed, "source_image": case.image_path,
                                     "background_image": background.image_path,
                                     "reason": scores.get("reason"), "qa": scores})
                    continue
            kept.append(sample)
    if keep_best is not None and len(kept) > keep_best:
        ranked = sorted(range(len(kept)), key=lambda i: -kept[i].details["qa"]["overall"])  # ties: sample order
        rejected += [{"seed": s.seed, "source_image": case.image_path, "background_image": s.background.image_path,
                      "reason": f"not among the best: passed, but the {keep_best} best of {settings.samples} "
                                f"scored higher (overall {s.details['qa']['overall']})",
                      "qa": s.details["qa"]} for s in (kept[i] for i in ranked[keep_best:])]
        kept = [kept[i] for i in sorted(ranked[:keep_best])]
    return kept, rejected
