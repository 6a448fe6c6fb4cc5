"""Output folders: staged and renamed into place (all or nothing), a manifest, a PNG preview."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .caseio import Case, output_suffix, write_array
from .errors import MedDiffFTError
from .generate import Sample
from .slicing import choose_axis, slice_stack


def check_output_dir(path: Path, overwrite: bool, *, what: str = "--out") -> None:
    """Refuse an existing non-empty folder unless ``overwrite`` (checked before any work)."""
    if path.exists() and not path.is_dir():
        raise MedDiffFTError(f"{what} {path} is a file; choose a folder path.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise MedDiffFTError(f"{what} {path} already exists and is not empty; choose another "
                             "folder or pass --overwrite to replace it.")


def partial_dir(path: Path) -> Path:
    """Where a resumable command stages ``path``: kept when the command is interrupted."""
    return path.with_name(f".{path.name}.partial")


@contextmanager
def staged_dir(path: Path, overwrite: bool, *, resumable: bool = False) -> Iterator[Path]:
    """Yield a sibling temporary folder; on success it replaces ``path``, so ``path`` is never left
    half-written. On failure it is removed, unless ``resumable``: then it is ``partial_dir(path)``,
    kept, and yielded again to the next call (which continues from what it holds; ``overwrite``
    starts it afresh)."""
    check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    if resumable:
        tmp = partial_dir(path)
        if overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(exist_ok=True)
    else:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        if not resumable:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write; it replaces ``path`` when the block
    succeeds and is removed when it fails. The name is this writer's own (process id and a random
    part), so processes writing the same file never share one; it keeps ``path``'s suffix, which
    some writers read the format from."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, payload: dict) -> None:
    """Write JSON atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=str))


def write_samples(directory: Path, samples: list[Sample], source: Case, *, start: int = 0) -> list[dict]:
    """Write each sample's image and label like its background's files; return manifest entries."""
    entries = []
    for number, sample in enumerate(samples, start=start + 1):
        background = sample.background
        image_name = f"sample_{number:03d}{output_suffix(background, is_label=False)}"
        label_name = f"sample_{number:03d}_label{output_suffix(background, is_label=True)}"
        write_array(background, sample.image, directory / image_name, is_label=False)
        write_array(background, sample.label, directory / label_name, is_label=True)
        entries.append({"image": image_name, "label": label_name, "seed": sample.seed,
                        "source_image": source.image_path, "source_label": source.label_path,
                        "background_image": background.image_path, "slices": sample.slices,
                        "seconds": sample.seconds, **sample.details})
    return entries


def _tile(plane: np.ndarray, low: float, high: float, size: int = 160) -> np.ndarray:
    from PIL import Image

    grey = np.clip((plane.astype(np.float64) - low) / max(high - low, 1e-12) * 255, 0, 255).astype(np.uint8)
    im = Image.fromarray(grey)
    scale = size / max(im.size)
    return np.asarray(im.convert("RGB").resize((max(1, round(im.width * scale)),
                                                max(1, round(im.height * scale))), Image.BILINEAR))


def _outline(tile: np.ndarray, mask: np.ndarray) -> np.ndarray:
    from PIL import Image
    from scipy import ndimage

    mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
        (tile.shape[1], tile.shape[0]), Image.NEAREST)) > 0
    edge = mask & ~ndimage.binary_erosion(mask)
    out = tile.copy()
    out[edge] = (255, 64, 32)
    return out


def write_preview(path: Path, source: Case, samples: list[Sample], axis_spec: str) -> None:
    """A grid: the input slice, its mask outline, then each sample with its label outline (for
    volumes, the slice through the middle of the lesion)."""
    from PIL import Image

    axis = choose_axis(source.spacing, axis_spec, source.is_2d)

    def middle_slice(case_image: np.ndarray, fg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        stack, mask = slice_stack(case_image, axis), slice_stack(fg, axis)
        holding = np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))
        index = int(holding[len(holding) // 2]) if len(holding) else len(stack) // 2
        plane = stack[index]
        return (plane.mean(axis=-1) if plane.ndim == 3 else plane), mask[index]

    low, high = np.percentile(source.image, [0.5, 99.5])
    plane, mask = middle_slice(source.image, source.foreground)
    tiles = [_tile(plane, low, high), _outline(_tile(plane, low, high), mask)]
    for sample in samples:
        plane, mask = middle_slice(sample.image, sample.foreground)
        tiles.append(_outline(_tile(plane, low, high), mask))
    height = max(t.shape[0] for t in tiles) + 4
    width = max(t.shape[1] for t in tiles) + 4
    padded = [np.pad(t, ((0, height - t.shape[0]), (0, width - t.shape[1]), (0, 0))) for t in tiles]
    columns = min(6, len(padded))
    padded += [np.zeros_like(padded[0])] * (-len(padded) % columns)
    grid = np.concatenate([np.concatenate(padded[i:i + columns], axis=1)
                           for i in range(0, len(padded), columns)], axis=0)
    with atomic_file(path) as tmp:
        Image.fromarray(grid).save(tmp)
