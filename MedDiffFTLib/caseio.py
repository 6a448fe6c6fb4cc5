"""Case I/O: read an image and its label from NRRD, NIfTI, MHA, 2D image files or Slicer
``.seg.nrrd``; write outputs that keep the input's exact geometry, pixel type and intensity range.

Arrays use SimpleITK order: volumes ``(Z, Y, X)`` (``(Z, Y, X, C)`` for RGB); a 2D image is a
volume with one slice, ``(1, H, W[, C])``. Geometry is kept bit-for-bit by writing each output with
the *source file's own header* (pynrrd for NRRD, nibabel for NIfTI, SimpleITK ``CopyInformation``
for MHA), because re-encoding geometry through SimpleITK's NRRD/NIfTI writers is not exact.
"""

from __future__ import annotations

import csv
import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import MedDiffFTError

VOLUME_SUFFIXES = {".nrrd": "nrrd", ".nii": "nifti", ".nii.gz": "nifti", ".mha": "mha", ".mhd": "mha"}
PICTURE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp"}
GRID_TOLERANCE = 1e-5


def file_format(path: str | os.PathLike) -> str:
    """Format family of a path: ``nrrd``, ``seg.nrrd``, ``nifti``, ``mha`` or ``picture``."""
    name = str(path).lower()
    if name.endswith(".seg.nrrd"):
        return "seg.nrrd"
    for suffix, family in VOLUME_SUFFIXES.items():
        if name.endswith(suffix):
            return family
    if Path(name).suffix in PICTURE_SUFFIXES:
        return "picture"
    raise MedDiffFTError(
        f"{path}: unsupported file type. Use NRRD (.nrrd, .seg.nrrd), NIfTI (.nii, .nii.gz), "
        f"MHA (.mha/.mhd) or a 2D picture ({', '.join(sorted(PICTURE_SUFFIXES))})."
    )


@dataclass
class Case:
    """One labeled image, in memory, with what is needed to write outputs exactly like it.

    ``image`` keeps the input's dtype; ``label`` holds the label values on the image grid;
    ``foreground`` is the chosen segment (bool). ``spacing`` is per array axis (Z, Y, X).
    """

    image: np.ndarray
    label: np.ndarray
    foreground: np.ndarray
    spacing: tuple[float, float, float]
    image_path: str
    label_path: str | None
    image_format: str
    label_format: str | None
    is_2d: bool
    picture_mode: str | None = None
    segment_metadata: dict = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return 1 if self.image.ndim == 3 else self.image.shape[-1]


def image_key(image: np.ndarray) -> str:
    """Content key of an image: which case it is, wherever its file lies."""
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()[:16]


def _require_file(path: str | os.PathLike, what: str) -> None:
    if not os.path.isfile(path):
        raise MedDiffFTError(f"{what} {path!s} does not exist or is not a file: check the path.")


def _read_sitk(path: str, what: str) -> sitk.Image:
    _require_file(path, what)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise MedDiffFTError(f"{what} {path} could not be read ({str(exc).strip().splitlines()[-1]}); "
                             "is it a valid, complete image file?") from exc


def _read_picture(path: str, what: str) -> tuple[np.ndarray, str]:
    """Read a 2D picture as (H, W) or (H, W, 3) with its Pillow mode (for writing it back)."""
    from PIL import Image, UnidentifiedImageError

    _require_file(path, what)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("P", "PA", "LA", "RGBA"):
                has_alpha = "A" in im.getbands() or "transparency" in im.info
                im = im.convert("RGBA" if has_alpha else "RGB")
                if has_alpha:
                    arr = np.asarray(im)
                    if (arr[..., 3] != 255).any():
                        raise MedDiffFTError(f"{what} {path} has transparent pixels; save it without "
                                             "an alpha channel.")
                    im = im.convert("RGB")
                mode = "RGB"
            elif mode == "1":
                im, mode = im.convert("L"), "L"
            elif mode == "CMYK":
                im, mode = im.convert("RGB"), "RGB"
            return np.array(im), mode
    except UnidentifiedImageError as exc:
        raise MedDiffFTError(f"{what} {path} is not a readable image file.") from exc


def _scalar_check(img: sitk.Image, path: str, what: str) -> None:
    if img.GetNumberOfComponentsPerPixel() != 1 or img.GetDimension() not in (2, 3):
        raise MedDiffFTError(
            f"{what} {path} is {img.GetDimension()}D with {img.GetNumberOfComponentsPerPixel()} "
            "component(s) per voxel; a scalar 2D or 3D image is needed. Extract one channel/time "
            "point first (e.g. in Slicer: Volumes > Convert to scalar)."
        )


def _as_volume(img: sitk.Image) -> sitk.Image:
    """2D SimpleITK images become one-slice volumes so every case has (Z, Y, X) arrays."""
    if img.GetDimension() == 3:
        return img
    return sitk.JoinSeries([img])


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=GRID_TOLERANCE, atol=GRID_TOLERANCE)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=GRID_TOLERANCE, atol=1e-4)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=GRID_TOLERANCE))


def _is_subgrid(label: sitk.Image, image: sitk.Image) -> bool:
    """True when the label grid is an integer-offset crop of the image grid (lossless to embed)."""
    if not (np.allclose(label.GetSpacing(), image.GetSpacing(), rtol=GRID_TOLERANCE)
            and np.allclose(label.GetDirection(), image.GetDirection(), atol=GRID_TOLERANCE)):
        return False
    index = image.TransformPhysicalPointToContinuousIndex(label.GetOrigin())
    return bool(np.allclose(index, np.round(index), atol=1e-3))


def _label_onto_image_grid(label: sitk.Image, image: sitk.Image, label_path: str,
                           resample_label: bool) -> sitk.Image:
    if _same_grid(label, image):
        return label
    if resample_label or _is_subgrid(label, image):
        return sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                             label.GetPixelID())
    raise MedDiffFTError(
        f"Label {label_path} is not on the image's grid (image size {image.GetSize()}, spacing "
        f"{tuple(round(s, 6) for s in image.GetSpacing())}; label size {label.GetSize()}, spacing "
        f"{tuple(round(s, 6) for s in label.GetSpacing())}). Pass --resample-label to resample it "
        "onto the image grid (nearest neighbour), or export the label with the image as reference."
    )


def _read_seg_nrrd(path: str, image: sitk.Image, resample_label: bool) -> tuple[np.ndarray, dict]:
    """Read a Slicer ``.seg.nrrd`` as one label array (segment k -> value k+1) on the image grid."""
    import nrrd

    _require_file(path, "Label")
    try:
        data, header = nrrd.read(path, index_order="C")
    except (nrrd.NRRDError, OSError, ValueError) as exc:
        raise MedDiffFTError(f"Label {path} is not a readable .seg.nrrd file ({exc}).") from exc
    segments = []
    k = 0
    while f"Segment{k}_ID" in header:
        segments.append({key[len(f"Segment{k}_"):]: value for key, value in header.items()
                         if key.startswith(f"Segment{k}_")})
        k += 1
    if not segments:
        raise MedDiffFTError(f"Label {path} has no segments (no Segment0_ID field): is it a Slicer "
                             ".seg.nrrd? Otherwise rename it to .nrrd.")
    layers = data[np.newaxis] if data.ndim == 3 else data  # (layers, Z, Y, X)
    if layers.ndim != 4:
        raise MedDiffFTError(f"Label {path} has {data.ndim} dimensions; expected a 3D segmentation.")
    merged = np.zeros(layers.shape[1:], dtype=np.uint16)
    for index, seg in enumerate(segments):
        layer = int(seg.get("Layer", 0))
        value = int(seg.get("LabelValue", index + 1))
        merged[layers[layer] == value] = index + 1
    spacing_dirs = np.asarray(header["space directions"], dtype=float)[-3:]  # rows: I, J, K axes
    spacing = np.linalg.norm(spacing_dirs, axis=1)
    direction = (spacing_dirs / spacing[:, None]).T
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=float)
    if header.get("space", "left-posterior-superior") in ("right-anterior-superior", "RAS"):
        flip = np.diag([-1.0, -1.0, 1.0])
        direction, origin = flip @ direction, flip @ origin
    label = sitk.GetImageFromArray(merged)
    label.SetSpacing(tuple(spacing))
    label.SetDirection(tuple(direction.ravel()))
    label.SetOrigin(tuple(origin))
    label = _label_onto_image_grid(label, image, path, resample_label)
    metadata = {f"Segment{i}_{key}": value for i, seg in enumerate(segments)
                for key, value in seg.items() if key not in ("Layer", "LabelValue", "Extent")}
    names = [str(seg.get("Name", f"Segment_{i + 1}")) for i, seg in enumerate(segments)]
    metadata["names"] = names
    return sitk.GetArrayFromImage(label), metadata


def _choose_foreground(label: np.ndarray, segment: str | None, label_path: str,
                       names: list[str] | None) -> np.ndarray:
    if segment is None:
        return label != 0
    if names is not None and segment in names:
        return label == names.index(segment) + 1
    try:
        value = int(segment)
    except ValueError:
        known = f" Segments in the file: {', '.join(names)}." if names else ""
        raise MedDiffFTError(f"--segment {segment!r} is neither a segment name nor a label value of "
                             f"{label_path}.{known}") from None
    return label == value  # for .seg.nrrd, a segment's 1-based position is its merged value


def read_case(image_path: str, label_path: str | None = None, *, segment: str | None = None,
              resample_label: bool = False, require_label: bool = True,
              allow_empty: bool = False) -> Case:
    """Read an image and (optionally) its label; validate everything before any work starts.

    ``allow_empty`` accepts an empty label (lesion-free training cases still count).

    Raises:
        MedDiffFTError: missing/unreadable file, non-scalar image, NaN/Inf intensities, label not
            on the image grid (without ``resample_label``), empty label or segment.
    """
    image_path = str(image_path)
    image_format = file_format(image_path)
    picture_mode = None
    segment_metadata: dict = {}
    if image_format == "seg.nrrd":
        raise MedDiffFTError(f"{image_path} is a segmentation; pass it with --label, and the image "
                             "with --image.")
    if image_format == "picture":
        pixels, picture_mode = _read_picture(image_path, "Image")
        if pixels.ndim == 3 and (pixels == pixels[..., :1]).all():
            pixels = pixels[..., 0]  # grey stored as RGB: one channel inside, RGB again on write
        image = pixels[np.newaxis]
        spacing = (1.0, 1.0, 1.0)
        is_2d = True
        sitk_image = sitk.GetImageFromArray(image if image.ndim == 3 else image[..., 0])
    else:
        sitk_image = _read_sitk(image_path, "Image")
        _scalar_check(sitk_image, image_path, "Image")
        is_2d = sitk_image.GetDimension() == 2
        sitk_image = _as_volume(sitk_image)
        image = sitk.GetArrayFromImage(sitk_image)
        spacing = tuple(float(s) for s in reversed(sitk_image.GetSpacing()))
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        raise MedDiffFTError(f"Image {image_path} contains NaN or Inf intensities; replace them "
                             "(e.g. with the minimum intensity) before using it.")

    label_format = None
    if label_path is None:
        if require_label:
            raise MedDiffFTError(f"No label given for {image_path}: pass --label with a label image.")
        label = np.zeros(image.shape[:3], dtype=np.uint8)
    else:
        label_path = str(label_path)
        label_format = file_format(label_path)
        if label_format == "seg.nrrd":
            label, segment_metadata = _read_seg_nrrd(label_path, sitk_image, resample_label)
        elif label_format == "picture":
            pixels, _ = _read_picture(label_path, "Label")
            pixels = pixels.max(axis=-1) if pixels.ndim == 3 else pixels
            if pixels.shape != image.shape[1:3]:
                if not resample_label:
                    raise MedDiffFTError(
                        f"Label {label_path} is {pixels.shape[1]}x{pixels.shape[0]} pixels but image "
                        f"{image_path} is {image.shape[2]}x{image.shape[1]}. Pass --resample-label to "
                        "resize the label (nearest neighbour) or use a label of the image's size.")
                from PIL import Image

                pixels = np.asarray(Image.fromarray(pixels).resize(
                    (image.shape[2], image.shape[1]), Image.NEAREST))
            label = pixels[np.newaxis]
        else:
            sitk_label = _read_sitk(label_path, "Label")
            _scalar_check(sitk_label, label_path, "Label")
            sitk_label = _as_volume(sitk_label)
            if image_format == "picture" and sitk_label.GetSize() == sitk_image.GetSize():
                sitk_label.CopyInformation(sitk_image)  # pictures carry no geometry
            sitk_label = _label_onto_image_grid(sitk_label, sitk_image, label_path, resample_label)
            label = sitk.GetArrayFromImage(sitk_label)
            if np.issubdtype(label.dtype, np.floating):
                if not np.isfinite(label).all():
                    raise MedDiffFTError(f"Label {label_path} contains NaN or Inf values.")
                label = np.rint(label).astype(np.int32)
    names = segment_metadata.get("names")
    foreground = _choose_foreground(label, segment, str(label_path), names)
    if label_path is not None and not allow_empty and not foreground.any():
        what = f"segment {segment!r} of " if segment is not None else ""
        raise MedDiffFTError(f"The label ({what}{label_path}) is empty: nothing to learn from or to "
                             "paint. Draw the lesion/structure first, or choose another --segment.")
    return Case(image=image, label=label, foreground=foreground, spacing=spacing,
                image_path=image_path, label_path=label_path, image_format=image_format,
                label_format=label_format, is_2d=is_2d, picture_mode=picture_mode,
                segment_metadata=segment_metadata)


def read_cases_csv(path: str) -> list[tuple[str, str | None]]:
    """Read ``image,label`` rows; relative paths are relative to the CSV's folder."""
    _require_file(path, "Cases file")
    base = Path(path).parent
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "image" not in reader.fieldnames:
            raise MedDiffFTError(f"{path} needs a header row with columns 'image,label'.")
        rows = []
        for row in reader:
            image = row["image"].strip()
            label = (row.get("label") or "").strip() or None
            rows.append((str(base / image), str(base / label) if label else None))
    if not rows:
        raise MedDiffFTError(f"{path} lists no cases.")
    return rows


# ---------------------------------------------------------------------------------------------
# Writing


def output_format(case: Case, *, is_label: bool) -> str:
    """Outputs follow the image's format family (its header carries the exact geometry); a
    ``.seg.nrrd`` label of an NRRD image stays a ``.seg.nrrd`` (segment names and colors kept)."""
    if is_label and case.label_format == "seg.nrrd" and case.image_format == "nrrd":
        return "seg.nrrd"
    return case.image_format


def output_suffix(case: Case, *, is_label: bool) -> str:
    """File ending of an output in the input's format family (pictures become PNG)."""
    fmt = output_format(case, is_label=is_label)
    if fmt == "picture":
        return ".png"
    if fmt == "nifti":
        return ".nii.gz" if case.image_path.lower().endswith(".gz") else ".nii"
    if fmt == "mha":
        return ".mha"
    return ".seg.nrrd" if fmt == "seg.nrrd" else ".nrrd"


def _atomic_target(path: Path):
    """A temporary sibling of ``path`` (same folder, same suffix) to write before renaming."""
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _write_nrrd_like(source_path: str, array: np.ndarray, path: Path, extra: dict | None = None) -> None:
    import nrrd

    header = nrrd.read_header(source_path)
    keep = {k: v for k, v in header.items()
            if k not in ("type", "dimension", "sizes", "endian", "data file", "line skip",
                         "byte skip", "encoding") and not k.startswith("Segment")}
    keep["encoding"] = header.get("encoding", "gzip") if header.get("encoding") in ("raw", "gzip") \
        else "gzip"
    if extra:
        keep.update(extra)
    data = array[0] if int(header["dimension"]) == 2 else array
    nrrd.write(str(path), np.ascontiguousarray(data), header=keep, index_order="C")


def _write_nifti_like(source_path: str, array: np.ndarray, path: Path) -> None:
    import nibabel as nib

    source = nib.load(source_path)
    header = source.header.copy()
    header.set_data_dtype(array.dtype)
    data = array[0] if len(source.shape) == 2 else array
    data = np.ascontiguousarray(data.transpose(tuple(range(data.ndim))[::-1]))
    image = type(source)(data, None, header)
    image.header.set_slope_inter(1.0, 0.0)
    nib.save(image, str(path))


def _write_sitk_like(source_path: str, array: np.ndarray, path: Path) -> None:
    source = sitk.ReadImage(source_path)
    data = array[0] if source.GetDimension() == 2 else array
    out = sitk.GetImageFromArray(data)
    out.CopyInformation(source)
    sitk.WriteImage(out, str(path), useCompression=True)


def _write_picture(array: np.ndarray, mode: str, path: Path) -> None:
    from PIL import Image

    pixels = array[0]
    if mode == "RGB" and pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
    Image.fromarray(pixels).save(str(path), format="PNG")


def write_array(case: Case, array: np.ndarray, path: Path, *, is_label: bool) -> None:
    """Write ``array`` (the case's array layout) to ``path`` atomically, like the case's file.

    The image grid's header is used for labels too: outputs share the image's exact geometry.
    """
    tmp = _atomic_target(path)
    try:
        fmt = output_format(case, is_label=is_label)
        if fmt == "picture":
            _write_picture(array, "L" if is_label else (case.picture_mode or "L"), tmp)
        elif fmt in ("nrrd", "seg.nrrd"):
            _write_nrrd_like(case.image_path, array, tmp, _seg_header(case) if fmt == "seg.nrrd" else None)
        elif fmt == "nifti":
            _write_nifti_like(case.image_path, array, tmp)
        else:
            _write_sitk_like(case.image_path, array, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _seg_header(case: Case) -> dict:
    """Slicer segment fields for a one-layer ``.seg.nrrd`` whose segment k has value k+1."""
    fields = {k: v for k, v in case.segment_metadata.items() if k != "names"}
    for index in range(len(case.segment_metadata.get("names", []))):
        fields[f"Segment{index}_Layer"] = "0"
        fields[f"Segment{index}_LabelValue"] = str(index + 1)
    return {k: str(v) for k, v in fields.items()}


def cast_like(values: np.ndarray, case: Case) -> np.ndarray:
    """Cast generated intensities to the input's pixel type, clipped to its intensity range."""
    low, high = case.image.min(), case.image.max()
    values = np.clip(values, low, high)
    if np.issubdtype(case.image.dtype, np.integer):
        values = np.rint(values)
    return values.astype(case.image.dtype)
