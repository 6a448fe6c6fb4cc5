"""Export: real and synthetic pairs as training sets other tools read directly.

``write_nnunet_dataset`` writes an nnU-Net v2 raw dataset (``DatasetXXX_NAME/imagesTr``,
``labelsTr``, ``dataset.json``) with every case in one file format and label values remapped to
the consecutive integers nnU-Net requires; ``meddiffft_cases.json`` next to ``dataset.json`` says
which cases are synthetic and where each came from (nnU-Net ignores it). ``write_monai_datalist``
writes a MONAI (Decathlon-style) datalist that points at the files where they are, each entry
flagged ``synthetic``.

Cases come from run folders (their ``manifest.json``; a ``meddiffft batch`` folder stands for all
its case folders) and from an optional real ``image,label`` CSV.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .batch import BATCH_RECORD
from .caseio import Case, file_format, read_case, read_cases_csv, write_array
from .errors import MedDiffFTError
from .outputs import check_output_dir, staged_dir, write_json
from .progress import Progress

MANIFEST = "manifest.json"
CASES_SIDECAR = "meddiffft_cases.json"
NNUNET_FILE_ENDINGS = {"nifti": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha", "picture": ".png"}
DATASET_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class ExportCase:
    """One image+label pair to export; ``run`` is the run folder of a synthetic pair."""

    image: str
    label: str
    synthetic: bool
    run: str | None = None
    seed: int | None = None
    source_image: str | None = None


def run_folders(path: str | os.PathLike) -> list[Path]:
    """A run folder (has ``manifest.json``), or a ``meddiffft batch`` folder: its finished cases."""
    folder = Path(path)
    if (folder / MANIFEST).is_file():
        return [folder]
    if (folder / BATCH_RECORD).is_file():
        return sorted(p for p in (folder / "cases").iterdir() if (p / MANIFEST).is_file())
    raise MedDiffFTError(f"--from {path}: no {MANIFEST} there; pass a folder written by `meddiffft "
                         "run`, `sample` or `batch`.")


def synthetic_cases(run_dirs: list[str]) -> list[ExportCase]:
    """Every kept sample of the given run folders (rejected samples have no files)."""
    cases = []
    for folder in (f for path in run_dirs for f in run_folders(path)):
        for entry in json.loads((folder / MANIFEST).read_text())["samples"]:
            image, label = folder / entry["image"], folder / entry["label"]
            for path in (image, label):
                if not path.is_file():
                    raise MedDiffFTError(f"{path} is listed in {folder / MANIFEST} but missing; was "
                                         "the run folder changed after it was written?")
            cases.append(ExportCase(str(image), str(label), True, str(folder), entry.get("seed"),
                                    entry.get("source_image")))
    return cases


def gather_cases(run_dirs: list[str], real_csv: str | None) -> list[ExportCase]:
    """Real cases (CSV order) first, then the synthetic ones (run order)."""
    real = []
    if real_csv:
        for image, label in read_cases_csv(real_csv):
            if label is None:
                raise MedDiffFTError(f"{real_csv}: {image} has no label; every real case needs one.")
            real.append(ExportCase(image, label, False))
    cases = real + synthetic_cases(run_dirs)
    if not cases:
        raise MedDiffFTError("Nothing to export: the run folders hold no samples and no --real CSV was given.")
    return cases


def _file_ending(cases: list[ExportCase]) -> str:
    """One ending for all files (nnU-Net needs one): the cases' own when they agree, else
    ``.nii.gz`` for volumes; pictures and volumes cannot mix."""
    families = {file_format(case.image) for case in cases}
    if "picture" in families and len(families) > 1:
        raise MedDiffFTError("The cases mix 2D pictures and volumes; export them as two datasets.")
    endings = {NNUNET_FILE_ENDINGS[family] for family in families}
    return endings.pop() if len(endings) == 1 else ".nii.gz"


def _write_pair(case: Case, image_path: Path, label_path: Path, label: np.ndarray) -> None:
    """Write the case's image and ``label`` in the paths' format: pictures as grey or RGB PNG,
    volumes with the source file's own header when the format stays (exact geometry), else
    converted by SimpleITK."""
    if case.image_format == "picture":
        from PIL import Image

        Image.fromarray(case.image[0]).save(image_path, format="PNG")
        Image.fromarray(label[0]).save(label_path, format="PNG")
    elif image_path.name.endswith(NNUNET_FILE_ENDINGS[case.image_format]):
        write_array(case, case.image, image_path, is_label=False)
        write_array(case, label, label_path, is_label=True)
    else:
        reference = sitk.ReadImage(case.image_path)
        for array, path in ((case.image, image_path), (label, label_path)):
            out = sitk.GetImageFromArray(array[0] if reference.GetDimension() == 2 else array)
            out.CopyInformation(reference)
            sitk.WriteImage(out, str(path), useCompression=True)


def _read(case: ExportCase) -> Case:
    return read_case(case.image, case.label, allow_empty=True)


def _sidecar_entry(case_id: str, case: ExportCase) -> dict:
    return {"case": case_id, "synthetic": case.synthetic, "image_source": case.image,
            "label_source": case.label, "run": case.run, "seed": case.seed,
            "source_image": case.source_image}


def write_nnunet_dataset(cases: list[ExportCase], *, raw_dir: Path, dataset_id: int, name: str,
                         overwrite: bool, progress: Progress) -> Path:
    """Write ``raw_dir/DatasetXXX_NAME`` (staged: all or nothing); returns its path.

    Cases are named ``NAME_0001``...; label value v is written as its index in the sorted values
    found in all labels, and ``dataset.json`` names it ``label_v``.
    """
    if not 1 <= dataset_id <= 999:
        raise MedDiffFTError(f"--dataset-id {dataset_id}: nnU-Net dataset ids are 1 to 999.")
    if not DATASET_NAME.match(name):
        raise MedDiffFTError(f"--name {name!r}: use letters, digits, '_' and '-' only.")
    folder = raw_dir / f"Dataset{dataset_id:03d}_{name}"
    clashes = sorted(p.name for p in raw_dir.glob(f"Dataset{dataset_id:03d}_*") if p != folder)
    if clashes:
        raise MedDiffFTError(f"{raw_dir} already holds {', '.join(clashes)} with id {dataset_id}; "
                             "nnU-Net needs unique ids: choose another --dataset-id.")
    check_output_dir(folder, overwrite)
    ending = _file_ending(cases)
    values, channels = {0}, set()
    with progress.stage("export", 2 * len(cases)) as advance:
        for case in cases:  # first pass: label values and channels (one case in memory at a time)
            data = _read(case)
            values |= set(np.unique(data.label).tolist())
            channels.add(data.channels)
            advance(1)
        if len(channels) > 1:
            raise MedDiffFTError(f"The cases have different channel counts ({sorted(channels)}); "
                                 "nnU-Net needs the same channels in every case.")
        values = sorted(int(v) for v in values)
        if values[0] < 0:
            raise MedDiffFTError(f"Label values must not be negative (found {values[0]}).")
        lookup = np.zeros(values[-1] + 1, dtype=np.uint16 if len(values) > 256 else np.uint8)
        lookup[values] = np.arange(len(values))
        entries = []
        with staged_dir(folder, overwrite) as tmp:
            (tmp / "imagesTr").mkdir()
            (tmp / "labelsTr").mkdir()
            for number, case in enumerate(cases, start=1):
                case_id = f"{name}_{number:04d}"
                data = _read(case)
                _write_pair(data, tmp / "imagesTr" / f"{case_id}_0000{ending}",
                            tmp / "labelsTr" / f"{case_id}{ending}", lookup[data.label])
                entries.append(_sidecar_entry(case_id, case))
                advance(1)
            write_json(tmp / "dataset.json", {  # pictures are grey or RGB, volumes scalar
                "channel_names": {"0": "R", "1": "G", "2": "B"} if channels == {3} else {"0": "image"},
                "labels": {("background" if v == 0 else f"label_{v}"): i for i, v in enumerate(values)},
                "numTraining": len(cases), "file_ending": ending,
                "description": "Real and MedDiffFT synthetic cases; meddiffft_cases.json says which is which."})
            write_json(tmp / CASES_SIDECAR, {"cases": entries,
                                             "synthetic": [e["case"] for e in entries if e["synthetic"]]})
    return folder


def write_monai_datalist(cases: list[ExportCase], *, out: Path, overwrite: bool) -> Path:
    """A MONAI datalist ``{"training": [{"image", "label", "synthetic", ...}]}`` with paths relative
    to its own folder (``monai.data.load_decathlon_datalist`` resolves them against it)."""
    if out.exists() and not overwrite:
        raise MedDiffFTError(f"--out {out} already exists; choose another file or pass --overwrite.")
    if out.is_dir():
        raise MedDiffFTError(f"--out {out} is a folder; give a file path such as datalist.json.")
    for case in cases:  # unreadable pairs fail here, not in the training script
        _read(case)
    base = out.resolve().parent

    def relative(path: str) -> str:
        return os.path.relpath(Path(path).resolve(), base)

    training = [{"image": relative(c.image), "label": relative(c.label), "synthetic": c.synthetic,
                 **({"run": relative(c.run), "seed": c.seed} if c.synthetic else {})} for c in cases]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"description": "Real and MedDiffFT synthetic cases (synthetic: true).",
                     "training": training})
    return out
