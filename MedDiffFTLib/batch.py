"""Batches: fine-tune once on the listed cases, then generate for every case into its own run
folder, ``OUT/cases/NNNN_<image name>/``, resumably and, under ``accelerate launch``, split across
processes.

All processes fine-tune together (into ``OUT/model``, resuming from its checkpoints;
finetune_model is data parallel under accelerate and only the main process writes). Every process
then takes the same list of unfinished cases (made after a barrier, before anyone writes) and its
own contiguous share of it (``PartialState.split_between_processes``), so no case is written twice
or left out. A case folder is written staged and renamed into place, so a finished case is one
whose folder exists; a restart skips those. ``OUT/batch.json`` records the options (a restart must
use the same ones) and which process generated which case in the last run.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from .backbone import MODEL_CARD
from .caseio import Case
from .errors import MedDiffFTError
from .outputs import check_output_dir, staged_dir, write_json
from .progress import Progress

BATCH_RECORD = "batch.json"
Pair = tuple[str, str | None]


def case_ids(pairs: list[Pair]) -> list[str]:
    """``NNNN_<image file name without suffixes>``: unique, and sorted like the CSV."""
    return [f"{number:04d}_{re.sub(r'[^A-Za-z0-9_-]+', '_', Path(image).name.split('.')[0])}"
            for number, (image, _) in enumerate(pairs, start=1)]


def _prepare_out(out: Path, record: dict, overwrite: bool) -> None:
    """Start a batch folder, or check that a restart continues the same batch; drop the staging
    folders an interrupted run left behind."""
    if overwrite and out.exists():
        shutil.rmtree(out)
    previous = out / BATCH_RECORD
    if previous.is_file():
        before = json.loads(previous.read_text())
        changed = sorted(k for k in set(before["options"]) | set(record["options"])
                         if before["options"].get(k) != record["options"].get(k))
        if before["cases"] != record["cases"]:
            changed.insert(0, "cases")
        if changed:
            raise MedDiffFTError(f"{out} holds a batch made with other {', '.join(changed)}; rerun it "
                                 "with the same options to continue it, or pass --overwrite to start over.")
    else:
        check_output_dir(out, False)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    for leftover in (out / "cases").glob(".*"):
        shutil.rmtree(leftover, ignore_errors=True)
    write_json(previous, record)


def run_batch(pairs: list[Pair], out: Path, *, options: dict, overwrite: bool, cpu: bool,
              progress: Progress, read: Callable[[Pair], Case],
              finetune: Callable[[Path, list[Case]], None],
              generate: Callable[[Path, Path, Case, int], None]) -> dict:
    """Fine-tune unless ``OUT/model`` is complete (every process takes part: finetune_model
    averages gradients across processes and only the main one writes), then ``generate(case
    folder, model folder, case, its index in pairs)`` for this process's share of the unfinished
    cases.

    ``options`` are what must match on a restart; ``cpu`` makes launched processes talk over gloo
    (without it accelerate expects one GPU per process). Returns this run's record (all processes').
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState(cpu=cpu)
    try:
        ids = case_ids(pairs)
        model_dir, cases_dir = out / "model", out / "cases"
        record = {"options": options, "cases": [{"case": i, "image": p[0], "label": p[1]}
                                                for i, p in zip(ids, pairs)]}
        if state.is_main_process:
            _prepare_out(out, record, overwrite)
        state.wait_for_everyone()
        if not (model_dir / MODEL_CARD).is_file():
            finetune(model_dir, [read(pair) for pair in pairs])  # reads (validates) every case first
        state.wait_for_everyone()
        todo = [index for index, case_id in enumerate(ids) if not (cases_dir / case_id).is_dir()]
        state.wait_for_everyone()  # everyone has its list before any case is written
        generated = []
        with state.split_between_processes(todo) as mine:
            name = "cases" if state.num_processes == 1 else \
                f"cases (process {state.process_index + 1}/{state.num_processes})"
            with progress.stage(name, len(mine)) as advance:
                for index in mine:
                    with staged_dir(cases_dir / ids[index], False) as tmp:
                        generate(tmp, model_dir, read(pairs[index]), index)
                    generated.append({"case": ids[index], "process": state.process_index})
                    advance(1)
        last_run = {"processes": state.num_processes, "generated": gather_object(generated),
                    "skipped": [i for n, i in enumerate(ids) if n not in todo]}
        if state.is_main_process:
            write_json(out / BATCH_RECORD, {**record, "last_run": last_run})
        state.wait_for_everyone()
        return last_run
    finally:  # an open process group aborts the process at exit; closing it also frees the others
        state.destroy_process_group()  # from a barrier when this process failed
