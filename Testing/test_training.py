"""Training options: unlabeled pretraining, `meddiffft pretrain` + --init-model, the time budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import COMMON, TRAIN_TINY, make_volume, write_volume

from MedDiffFTLib.cli import run_command
from MedDiffFTLib.errors import MedDiffFTError


def card(model):
    return json.loads((model / "meddiffft.json").read_text())


def test_pretrain_then_finetune_from_it(tmp_path, volume_case):
    image, label = volume_case()
    unlabeled = write_volume(make_volume(seed=5)[0], tmp_path / "unlabeled.nrrd")
    run_command(["pretrain", "--unlabeled", unlabeled, "--model-out", tmp_path / "pre", *TRAIN_TINY, *COMMON])
    pre = card(tmp_path / "pre")
    assert pre["training"]["pretrain_steps"] == 4 and pre["training"]["steps"] == 0
    assert pre["training"]["unlabeled"] == [str(unlabeled)]
    assert not (tmp_path / "pre" / "lesion_bank.safetensors").exists()
    with pytest.raises(MedDiffFTError, match="--init transplant needs real lesions"):
        run_command(["sample", "--model", tmp_path / "pre", "--image", image, "--label", label,
                     "--init", "transplant", "--qa", "off", "--mask-source", "label", "--out",
                     tmp_path / "out", *COMMON])
    assert not (tmp_path / "out").exists()
    run_command(["finetune", "--image", image, "--label", label, "--init-model", tmp_path / "pre",
                 "--model-out", tmp_path / "ft", *TRAIN_TINY, *COMMON])
    assert card(tmp_path / "ft")["training"]["init_model"] == str(tmp_path / "pre")
    with pytest.raises(MedDiffFTError, match="--init-model .* works at 32 px"):
        run_command(["finetune", "--image", image, "--label", label, "--init-model", tmp_path / "pre",
                     "--model-out", tmp_path / "bad", *TRAIN_TINY, "--resolution", "64", *COMMON])


def test_unlabeled_data_adds_a_pretraining_phase(tmp_path, volume_case):
    image, label = volume_case()
    unlabeled = write_volume(make_volume(seed=6)[0], tmp_path / "unlabeled.nrrd")
    events = []
    run_command(["finetune", "--image", image, "--label", label, "--unlabeled", unlabeled,
                 "--model-out", tmp_path / "m", *TRAIN_TINY, *COMMON], on_progress=events.append)
    training = card(tmp_path / "m")["training"]
    assert training["pretrain_steps"] == 4 and training["steps_done"] == 8
    assert max(e["total"] for e in events if e.get("stage") == "finetune") == 8
    assert len(json.loads((tmp_path / "m" / "training_loss.json").read_text())) == 8


def test_time_budget_stops_training_early(tmp_path, volume_case):
    image, label = volume_case()
    run_command(["finetune", "--image", image, "--label", label, "--train-minutes", "0",
                 "--model-out", tmp_path / "m", *TRAIN_TINY, "--train-steps", "1000", *COMMON])
    training = card(tmp_path / "m")["training"]
    assert training["steps_done"] < 1000 and training["minutes"] == 0


def test_lesion_free_training_case_counts(tmp_path, volume_case):
    image, label = volume_case()
    empty = write_volume(np.zeros((6, 28, 24), np.uint8), tmp_path / "empty.nrrd")
    run_command(["finetune", "--image", image, "--label", label, "--image", image, "--label", empty,
                 "--model-out", tmp_path / "m", *TRAIN_TINY, *COMMON])
    assert len(card(tmp_path / "m")["training"]["cases"]) == 2
