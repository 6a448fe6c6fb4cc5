"""`meddiffft batch`: one fine-tune, one run folder per case, resumable, split across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import COMMON, TRAIN_TINY, make_volume, write_volume

from MedDiffFTLib.cli import run_command
from MedDiffFTLib.errors import MedDiffFTError

FAST = [*TRAIN_TINY, "--samples", "1", "--sampling-steps", "2", "--qa", "off"]
IDS = ["0001_case0", "0002_case1", "0003_case2", "0004_case3"]


def cases_csv(folder: Path, count: int = 4) -> Path:
    rows = ["image,label"]
    for seed in range(count):
        image, label = make_volume(seed)
        write_volume(image, folder / f"case{seed}.nrrd")
        write_volume(label, folder / f"case{seed}_label.nrrd")
        rows.append(f"case{seed}.nrrd,case{seed}_label.nrrd")
    (folder / "cases.csv").write_text("\n".join(rows) + "\n")
    return folder / "cases.csv"


def record(out: Path) -> dict:
    return json.loads((out / "batch.json").read_text())


def test_two_accelerate_processes_write_each_case_exactly_once(tmp_path):
    csv = cases_csv(tmp_path)
    out = tmp_path / "out"
    backgrounds = [tmp_path / f"background{n}.nrrd" for n in range(3)]
    for n, path in enumerate(backgrounds):
        write_volume(make_volume(10 + n)[0], path)
    accelerate = Path(sys.executable).with_name("accelerate")
    # `--cpu` would start one process (accelerate's multi-CPU launch needs MPI); the torchrun
    # launcher starts two, and --device cpu makes them talk over gloo.
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "MedDiffFTLib.cli", "batch",
               "--cases", str(csv), "--out", str(out), *FAST, *COMMON,
               *(arg for path in backgrounds for arg in ("--background", str(path)))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    last_run = record(out)["last_run"]
    assert last_run["processes"] == 2 and last_run["skipped"] == []
    assert sorted(e["case"] for e in last_run["generated"]) == IDS  # none twice, none missing
    assert {e["case"]: e["process"] for e in last_run["generated"]} == dict(zip(IDS, [0, 0, 1, 1]))
    assert sorted(p.name for p in (out / "cases").iterdir()) == IDS  # no staging leftovers
    for case_id, seed in zip(IDS, range(4)):
        manifest = json.loads((out / "cases" / case_id / "manifest.json").read_text())
        assert [s["source_image"] for s in manifest["samples"]] == [str(tmp_path / f"case{seed}.nrrd")]
        # the --background cycle follows the case's place in the list, whichever process paints it
        assert [s["background_image"] for s in manifest["samples"]] == [str(backgrounds[seed % 3])]
        assert manifest["model"]["path"] == str(out / "model")
    card = json.loads((out / "model" / "meddiffft.json").read_text())
    assert card["training"]["steps_done"] == 4 and len(card["training"]["cases"]) == 4


def test_restart_skips_finished_cases_and_keeps_the_model(tmp_path):
    csv = cases_csv(tmp_path, 3)
    out = tmp_path / "out"
    argv = ["batch", "--cases", csv, "--out", out, *FAST, *COMMON]
    first = run_command(argv)
    assert (first["generated"], first["skipped"]) == (3, 0)
    model_time = (out / "model" / "meddiffft.json").stat().st_mtime_ns
    kept = {i: (out / "cases" / i / "manifest.json").stat().st_mtime_ns for i in IDS[:3]}
    for path in (out / "cases" / IDS[1]).iterdir():  # an unfinished case: no folder, a staging leftover
        path.unlink()
    (out / "cases" / IDS[1]).rename(out / "cases" / f".{IDS[1]}.abc123")
    again = run_command(argv)
    assert (again["generated"], again["skipped"]) == (1, 2)
    last_run = record(out)["last_run"]
    assert last_run["generated"] == [{"case": IDS[1], "process": 0}]
    assert last_run["skipped"] == [IDS[0], IDS[2]]
    assert sorted(p.name for p in (out / "cases").iterdir()) == IDS[:3]
    assert (out / "model" / "meddiffft.json").stat().st_mtime_ns == model_time  # not fine-tuned again
    for case_id in (IDS[0], IDS[2]):
        assert (out / "cases" / case_id / "manifest.json").stat().st_mtime_ns == kept[case_id]
    with pytest.raises(MedDiffFTError, match="holds a batch made with other samples, seed; rerun it "
                                             "with the same options to continue it, or pass --overwrite"):
        run_command([*argv, "--samples", "2", "--seed", "5"])


def test_export_takes_a_batch_folder_as_its_cases(tmp_path):
    csv = cases_csv(tmp_path, 2)
    out = tmp_path / "out"
    run_command(["batch", "--cases", csv, "--out", out, *FAST, *COMMON])
    result = run_command(["export", "monai", "--from", out, "--out", tmp_path / "list.json", "--progress", "none"])
    assert (result["synthetic"], result["real"]) == (2, 0)
    items = json.loads((tmp_path / "list.json").read_text())["training"]
    assert [item["run"] for item in items] == [f"out/cases/{i}" for i in IDS[:2]]
