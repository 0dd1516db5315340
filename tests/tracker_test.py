"""Experiment trackers: a run is named by its arm and seed and grouped by its arm, and a resumed run continues its
W&B run (wandb in offline mode: it writes its runs to WANDB_DIR)."""

import json
import shutil

import pytest
from conftest import TINY_TRAINING_FLAGS, run_in_process, run_script
from train_test import train_args

wandb = pytest.importorskip("wandb")

SCHEDULE = ("--max-steps", "4", "--save-steps", "2", "--eval-steps", "1000", *TINY_TRAINING_FLAGS)


def offline_runs(wandb_dir) -> list[tuple[str, bytes]]:
    """Each offline run's id (from its folder's name) and its records (the .wandb file)."""
    return [
        (folder.name.rsplit("-", 1)[1], next(folder.glob("run-*.wandb")).read_bytes())
        for folder in sorted((wandb_dir / "wandb").glob("offline-run-*"))
    ]


def tracker_record(output_dir) -> dict:
    return json.loads((output_dir / "tracker_run.json").read_text())


def test_seeds_of_one_arm_share_a_group_and_a_resumed_run_continues_its_wandb_run(
    tiny_model_dir, data_dir, tmp_path, monkeypatch
):
    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(name, value)
    first_dir, other_dir = tmp_path / "s42", tmp_path / "s43"
    result = run_in_process(
        "train.py", *train_args(tiny_model_dir, data_dir, first_dir, *SCHEDULE), "--report-to", "wandb"
    )
    wandb.teardown()  # what the end of the process does
    assert result.returncode == 0, result.stderr
    first = tracker_record(first_dir)
    # Another seed of the same arm, launched otherwise: another micro-batch split, no tracker.
    argv = train_args(tiny_model_dir, data_dir, other_dir, *SCHEDULE, "--batch-size", "2", "--grad-accum", "4")
    assert run_in_process("train.py", *argv, "--seed", "43", "--report-to", "none").returncode == 0
    other = tracker_record(other_dir)
    assert first["group"] == other["group"] and first["group"].startswith("arm-")
    assert (first["name"], other["name"]) == (f"{first['group']} seed 42", f"{first['group']} seed 43")
    assert first["wandb_id"] != other["wandb_id"]

    # The resume runs in a process of its own, as a requeued job would.
    shutil.rmtree(first_dir / "checkpoints" / "checkpoint-4")  # so that --resume trains steps 3 and 4
    resumed = run_script(
        "train.py", *train_args(tiny_model_dir, data_dir, first_dir, *SCHEDULE), "--report-to", "wandb", "--resume"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert tracker_record(first_dir) == first
    runs = offline_runs(tmp_path)
    assert [run_id for run_id, _ in runs] == [first["wandb_id"], first["wandb_id"]]
    assert all(first["group"].encode() in records and first["name"].encode() in records for _, records in runs)
